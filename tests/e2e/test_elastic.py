"""Elastic runs on one machine (launchers on 127.0.0.1 as nodes): torchrun's elastic line,
`--nnodes MIN:MAX --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`, unchanged on
every node. A node that joins mid-run is admitted at a generation boundary, a node that is
lost leaves a smaller world that goes on, and neither uses up --max-restarts. Across real
hosts (network namespaces, a cut link): tests/e2e/test_hosts.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.e2e.launch import (
    SCRIPTS,
    elastic_rows,
    elastic_steps_done,
    free_port,
    kill_tree,
    launcher_command,
    launcher_env,
    poll_until,
)

pytestmark = [pytest.mark.e2e]
STEPS, PAUSE_S = 60, 0.1


def elastic_line(port: int, *args: str, nnodes: str = "2:3") -> list[str]:
    return launcher_command(
        "--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job1", "--stop-grace", "1",
        "--max-restarts", "0", *args,
    )  # fmt: skip


def start(tmp_path: Path, port: int, *args: str, nnodes: str = "2:3") -> subprocess.Popen:
    return subprocess.Popen(
        elastic_line(port, *args, nnodes=nnodes),
        cwd=tmp_path, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def worlds(out: Path) -> list[tuple[int, int, int, int]]:
    """(generation, world size, rank, first step) of every rank's first step of a generation."""
    return [row[1:5] for row in elastic_rows(out)]


def events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "runs" / "job1" / "events.jsonl").read_text().splitlines()]


def finish(procs: list[subprocess.Popen], timeout_s: float = 90) -> list[tuple[int, str]]:
    done = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout_s)
            done.append((p.returncode, err))
    finally:
        for p in procs:
            kill_tree(p.pid)
    return done


@pytest.mark.timeout(150)
def test_a_node_that_joins_mid_run_trains_in_the_bigger_world(tmp_path):
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    script = [str(SCRIPTS / "elastic_train.py"), str(STEPS), str(PAUSE_S), str(out)]
    first = [start(tmp_path, port, *script), start(tmp_path, port, *script)]
    try:
        poll_until(lambda: len(worlds(out)) >= 2, 60, "the first generation's 2 ranks")
        poll_until(lambda: elastic_steps_done(out) >= 5, 30, "five steps")
        late = start(tmp_path, port, *script)
    except BaseException:
        finish(first, timeout_s=1)
        raise
    (code0, err0), (code1, err1), (code2, err2) = finish([*first, late])
    assert (code0, code1, code2) == (0, 0, 0), (err0[-3000:], err1[-2000:], err2[-2000:])
    seen = worlds(out)
    assert [(g, w, r) for g, w, r, _ in seen if g == 0] == [(0, 2, 0), (0, 2, 1)]
    bigger = [(w, r, step) for g, w, r, step in seen if g == 1]
    assert [(w, r) for w, r, _ in bigger] == [(3, 0), (3, 1), (3, 2)]  # contiguous ranks, one world
    assert len({step for _, _, step in bigger}) == 1 and bigger[0][2] >= 5  # it resumed, every rank alike
    lead = err0 if "no restart used" in err0 else err1  # the first two started at once
    assert "1 node(s) joined" in lead and "no restart used" in lead, (err0[-2000:], err1[-2000:])
    assert "waiting to be admitted" in err2 and "generation 1: node rank 2 of 3 node(s)" in err2
    log = events(tmp_path)
    (resize,) = [e for e in log if e["event"] == "resize"]
    assert (resize["generation"], resize["nnodes"], resize["world_size"]) == (1, 3, 3)
    (end,) = [e for e in log if e["event"] == "run_end"]
    assert (end["outcome"], end["restarts"]) == ("succeeded", 0)  # --max-restarts 0 was enough


@pytest.mark.timeout(150)
def test_a_lost_node_leaves_a_smaller_world_that_finishes(tmp_path):
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    script = [str(SCRIPTS / "elastic_train.py"), str(STEPS), str(PAUSE_S), str(out)]
    procs = [start(tmp_path, port, *script) for _ in range(3)]
    try:
        poll_until(lambda: len(worlds(out)) >= 3, 60, "the first generation's 3 ranks")
        poll_until(lambda: elastic_steps_done(out) >= 5, 30, "five steps")
        # Node 2's host vanishes: its launcher and its workers die at once (no goodbye).
        (worker,) = [row[5] for row in elastic_rows(out) if row[3] == 2]
        victim = next(p for p in procs if worker in [c.pid for c in psutil.Process(p.pid).children(recursive=True)])
        tree = [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]
        for proc in tree:
            proc.kill()
        victim.wait(timeout=10)
        survivors = [p for p in procs if p is not victim]
    except BaseException:
        finish(procs, timeout_s=1)
        raise
    (code0, err0), (code1, err1) = finish(survivors)
    assert (code0, code1) == (0, 0), (err0[-3000:], err1[-2000:])
    smaller = [(w, r) for g, w, r, _ in worlds(out) if g == 1]
    assert smaller == [(2, 0), (2, 1)]
    # Either survivor may be the host: the launchers started at once, and the first to take the
    # endpoint leads.
    lead, other = (err0, err1) if "no restart used" in err0 else (err1, err0)
    assert "node 2 (" in lead and "lost" in lead and "no restart used" in lead, lead[-3000:]
    assert "generation 1: node rank 1 of 2 node(s)" in other
    (end,) = [e for e in events(tmp_path) if e["event"] == "run_end"]
    assert (end["outcome"], end["restarts"]) == ("succeeded", 0)
    assert not [proc.pid for proc in tree if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(60)
def test_fewer_than_min_nodes_end_the_run_after_the_join_timeout(tmp_path):
    port = free_port()
    [(code, err)] = finish([start(tmp_path, port, "--join-timeout", "3", str(SCRIPTS / "env_dump.py"), str(tmp_path))])
    assert code != 0
    assert "only 1 of the 2 nodes that --nnodes 2:3 needs joined within --join-timeout (3 s)" in err
    assert not list(tmp_path.glob("env-*.json"))  # no worker ran


@pytest.mark.timeout(60)
def test_a_node_with_another_nproc_is_refused_with_exit_2_and_starts_nothing(tmp_path):
    port = free_port()
    host = start(tmp_path, port, "--join-timeout", "20", str(SCRIPTS / "env_dump.py"), str(tmp_path))
    try:
        poll_until(lambda: (tmp_path / "runs" / "job1" / "master.json").exists(), 30, "the master")
        odd = subprocess.run(
            [*elastic_line(port, "--nproc-per-node", "2", str(SCRIPTS / "env_dump.py"), str(tmp_path))],
            cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        kill_tree(host.pid)
    assert odd.returncode == 2, odd.stderr
    assert "--nproc-per-node 2; the run has 1 per node" in odd.stderr
    assert not list(tmp_path.glob("env-*.json"))
