"""In-memory snapshots (ddp_launch.snapshots, checkpoint.snapshot / load), in one process:
the writer thread, the commit by rename, the bound of two per rank, and which state `load`
picks. Across a real crash: tests/e2e/test_supervision.py (bit-identical resume)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ddp_launch import checkpoint, snapshots


@pytest.fixture
def where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "shm"
    d.mkdir()
    monkeypatch.setenv(snapshots.SNAPSHOT_DIR_ENV, str(d))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(checkpoint, "_taker", None)
    return d


def state_at(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "note": [step, (step,)]}


def test_a_snapshot_is_a_copy_taken_when_called_and_load_prefers_it_to_an_older_file(where, tmp_path):
    checkpoint.save(state_at(2), tmp_path / "ckpt.pt")
    live = state_at(5)
    assert checkpoint.snapshot(live, step=5)
    live["model"]["w"].fill_(99.0)  # the script's next step changes its tensors in place
    checkpoint._snapshotter().wait()
    assert [(f.rank, f.step) for f in snapshots.committed(where)] == [(0, 5)]
    got = checkpoint.load(tmp_path / "ckpt.pt")
    assert got["step"] == 5 and got["model"]["w"].tolist() == [5.0, 5.0, 5.0]
    assert got["note"] == [5, (5,)]
    assert checkpoint.loaded_from() == "the snapshot of step 5"


def test_a_newer_file_wins_and_makes_newer_snapshots_of_the_old_timeline_go(where, tmp_path):
    checkpoint.snapshot(state_at(3), step=3)
    checkpoint._snapshotter().wait()
    checkpoint.save(state_at(7), tmp_path / "ckpt.pt")
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 7
    assert checkpoint.loaded_from() == str(tmp_path / "ckpt.pt")
    assert [f.step for f in snapshots.committed(where)] == [3]  # older: harmless, kept
    # Once a resume from step 7 is chosen (the ranks agreed on it), a snapshot of step 9 left
    # on this node is another timeline's: it goes, so that no later load can pick it.
    (where / "rank-0.step-9.pt").write_bytes((where / "rank-0.step-3.pt").read_bytes())
    checkpoint._drop_snapshots_after(where, 7, sharded=False)
    assert [f.step for f in snapshots.committed(where)] == [3]


def test_nothing_to_resume_from_is_none(where, tmp_path):
    assert checkpoint.load(tmp_path / "missing.pt") is None
    assert checkpoint.loaded_from() is None


def test_outside_ddp_launch_snapshot_does_nothing_and_load_reads_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(snapshots.SNAPSHOT_DIR_ENV, raising=False)
    monkeypatch.setattr(checkpoint, "_taker", None)
    assert checkpoint.snapshot(state_at(1), step=1) is False
    checkpoint.save(state_at(4), tmp_path / "ckpt.pt")
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 4


def test_while_a_write_is_in_flight_the_next_call_takes_none(where, monkeypatch):
    release = threading.Event()
    real_save = torch.save

    def slow_save(obj, f, *a, **k):
        release.wait(10)
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", slow_save)
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    assert taker.take(state_at(1), 1)
    assert taker.take(state_at(2), 2) is False  # returns at once, nothing taken
    release.set()
    taker.wait(10)
    assert (taker.taken, taker.skipped) == (1, 1)
    assert [f.step for f in snapshots.committed(where)] == [1]


def test_at_most_two_per_rank_and_the_newest_committed_one_stays_while_the_next_is_written(where, monkeypatch):
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    for step in range(1, 5):
        taker.take(state_at(step), step)
        taker.wait(10)
    assert [f.step for f in snapshots.committed(where)] == [4]
    seen_during_write: list[list[int]] = []
    real_save = torch.save

    def watching_save(obj, f, *a, **k):
        seen_during_write.append([g.step for g in snapshots.committed(where)])
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", watching_save)
    taker.take(state_at(5), 5)
    taker.wait(10)
    assert seen_during_write == [[4]]  # the last committed one, and the one being written: two
    assert [f.step for f in snapshots.committed(where)] == [5]


def test_a_writer_killed_mid_write_leaves_no_snapshot_only_a_temp_that_goes(where):
    """A child process takes a snapshot whose torch.save dies half-way (os._exit)."""
    code = (
        "import os, torch\n"
        "from ddp_launch import snapshots\n"
        "t = snapshots.Snapshotter(__import__('pathlib').Path(os.environ['W']), 0, 0, 1)\n"
        "t.take({'w': torch.ones(3)}, 1); t.wait()\n"
        "def die(obj, f, *a, **k):\n"
        "    f.write(b'half a snapshot'); f.flush(); os._exit(9)\n"
        "torch.save = die\n"
        "t.take({'w': torch.zeros(3)}, 2); t.wait()\n"
    )
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "W": str(where)}, timeout=60)
    assert child.returncode == 9
    assert [f.step for f in snapshots.committed(where)] == [1]  # step 2 never committed
    assert [n for n in os.listdir(where) if ".tmp-" in n]  # the torn one is only a temp file
    snapshots.remove_orphans(where)
    assert sorted(os.listdir(where)) == ["rank-0.step-1.pt"]


def test_replicated_state_is_kept_once_per_node_sharded_state_by_every_rank(where):
    other = snapshots.Snapshotter(where, rank=1, local_rank=1, world_size=2)
    assert other.take(state_at(3), 3)  # local rank 0's copy serves it
    other.wait()
    assert snapshots.committed(where) == []
    assert other.take(state_at(3), 3, sharded=True)
    other.wait(10)
    assert [(f.rank, f.step) for f in snapshots.committed(where)] == [(1, 3)]
    assert snapshots.loadable_steps(where, 1, 2, sharded=True) == {3}
    assert snapshots.loadable_steps(where, 0, 2, sharded=True) == set()  # not rank 0's shard
    assert snapshots.loadable_steps(where, 1, 4, sharded=True) == set()  # another world
    assert snapshots.loadable_steps(where, 0, 2, sharded=False) == {3}


def test_the_launcher_makes_the_directory_in_memory_and_removes_it(tmp_path):
    d = snapshots.make_directory("run/with odd:chars", tmp_path)
    assert d.is_dir() and "/" not in d.name and " " not in d.name
    if Path("/dev/shm").is_dir():
        assert d.parent == Path("/dev/shm")
    snapshots.remove_directory(d)
    assert not d.exists()


def test_without_a_process_group_several_nodes_resume_from_the_file(where, tmp_path, monkeypatch):
    """Each node has snapshots of its own: ranks that cannot agree must not pick by node."""
    checkpoint.snapshot(state_at(6), step=6)
    checkpoint._snapshotter().wait()
    checkpoint.save(state_at(2), tmp_path / "ckpt.pt")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # one node: every rank sees the same ones
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 6
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 2
    assert snapshots.committed(where) == []  # step 6 is the timeline that was not kept
