"""Tools that detect a torchrun launch run unchanged; skipped where they are not installed."""

from __future__ import annotations

import json

import pytest

from tests.e2e.launch import SCRIPTS, run_launcher

pytestmark = [pytest.mark.e2e]


@pytest.mark.timeout(240)
def test_pytorch_lightning_sees_a_torchelastic_launch(tmp_path):
    pytest.importorskip("lightning")
    out = tmp_path / "out"
    out.mkdir()
    run = run_launcher(["-n", "2", str(SCRIPTS / "lightning_probe.py"), str(out)], tmp_path, timeout_s=200)
    assert run.returncode == 0, run.output
    seen = [json.loads((out / f"lightning-{r}.json").read_text()) for r in range(2)]
    assert [s["global_rank"] for s in seen] == [0, 1]
    assert all(s["cluster"] == "TorchElasticEnvironment" and s["world_size"] == 2 for s in seen)
    assert all(s["step"] == 4 for s in seen)
    assert seen[0]["pid"] != seen[1]["pid"]


@pytest.mark.timeout(240)
def test_accelerate_finds_its_place_from_the_environment(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    out.mkdir()
    run = run_launcher(["-n", "2", str(SCRIPTS / "accelerate_probe.py"), str(out)], tmp_path, timeout_s=200)
    assert run.returncode == 0, run.output
    seen = [json.loads((out / f"accelerate-{r}.json").read_text()) for r in range(2)]
    assert [s["process_index"] for s in seen] == [0, 1]
    assert all(s["num_processes"] == 2 and "MULTI_CPU" in s["distributed"] for s in seen)
