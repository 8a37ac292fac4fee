"""The manual mode: a master alone and four workers started by hand, as in four terminals."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.e2e.launch import SCRIPTS, free_port, kill_tree, launcher_command, launcher_env

pytestmark = [pytest.mark.e2e]


def _spawn(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        launcher_command(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=launcher_env(), start_new_session=True,
    )  # fmt: skip


@pytest.mark.timeout(180)
def test_a_master_and_four_hand_started_workers(tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    port = free_port()
    master = _spawn(["master", "--world-size", "4", "--port", str(port)], tmp_path)
    workers = []
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("runs/*/master.json")):  # the workers find it there
            assert time.monotonic() < deadline and master.poll() is None, master.communicate()
            time.sleep(0.1)
        workers = [_spawn(["worker", str(SCRIPTS / "env_dump.py"), str(out)], tmp_path) for _ in range(4)]
        results = [w.communicate(timeout=120) + (w.returncode,) for w in workers]
        m_out, m_err = master.communicate(timeout=60)
    finally:
        for p in [master, *workers]:
            kill_tree(p.pid)
    assert all(code == 0 for *_, code in results), results
    assert master.returncode == 0, m_err
    assert "waiting for 4 workers" in m_err
    seen = {r: json.loads((out / f"env-{r}.json").read_text()) for r in range(4)}
    assert len({e["pid"] for e in seen.values()}) == 4
    for r, e in seen.items():
        assert e["RANK"] == str(r) and e["WORLD_SIZE"] == "4"
        assert e["LOCAL_RANK"] == "0" and e["GROUP_RANK"] == str(r) and e["GROUP_WORLD_SIZE"] == "4"


@pytest.mark.timeout(120)
def test_a_hand_started_worker_that_fails_ends_the_run_with_its_traceback(tmp_path):
    port = free_port()
    master = _spawn(["master", "--world-size", "2", "--port", str(port)], tmp_path)
    workers = []
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob("runs/*/master.json")):
            assert time.monotonic() < deadline and master.poll() is None, master.communicate()
            time.sleep(0.1)
        workers = [_spawn(["worker", str(SCRIPTS / "fail.py"), "1", "raise"], tmp_path) for _ in range(2)]
        _, m_err = master.communicate(timeout=90)
    finally:
        for p in [master, *workers]:
            kill_tree(p.pid)
    assert master.returncode == 1, m_err
    assert "rank 1" in m_err and "ValueError: bad batch 7" in m_err
