"""CUDA placement and the nccl backend; skipped where no CUDA device is visible (CI)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.launch import EXAMPLE, SCRIPTS, digests, run_launcher

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _gpus() -> int:
    return torch.cuda.device_count()


@pytest.mark.timeout(180)
def test_auto_backend_is_nccl_and_each_rank_uses_cuda_local_rank(tmp_path):
    n = _gpus()
    out = tmp_path / "out"
    out.mkdir()
    run = run_launcher(["-n", str(n), str(SCRIPTS / "cuda_placement.py"), str(out)], tmp_path)
    assert run.returncode == 0, run.output
    for rank in range(n):
        seen = json.loads((out / f"cuda-{rank}.json").read_text())
        assert seen["backend"] == "nccl" and seen["dist_backend"] == "nccl"
        assert seen["current_device"] == seen["local_rank"] == rank
        assert seen["tensor_device"] == f"cuda:{rank}"
        assert seen["sum"] == n * (n + 1) / 2


@pytest.mark.timeout(180)
def test_more_workers_than_gpus_fall_back_to_gloo(tmp_path):
    n = _gpus() + 1
    out = tmp_path / "out"
    out.mkdir()
    run = run_launcher(["-n", str(n), str(SCRIPTS / "cuda_placement.py"), str(out)], tmp_path)
    assert run.returncode == 0, run.output
    seen = json.loads((out / "cuda-0.json").read_text())
    assert seen["backend"] == "gloo" and seen["tensor_device"] == "cpu"


@pytest.mark.timeout(240)
def test_example_trains_on_gpus_with_identical_parameters(tmp_path):
    n = _gpus()
    run = run_launcher(["-n", str(n), str(EXAMPLE), "--epochs", "1", "--max-steps", "20", "--print-digest"], tmp_path)
    assert run.returncode == 0, run.output
    found = digests(run.stdout)
    assert sorted(found) == list(range(n)) and len(set(found.values())) == 1
