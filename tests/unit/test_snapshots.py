"""In-memory snapshots (ddp_launch.snapshots, checkpoint.snapshot / load), in one process:
the slots and their commit, the bound of two per writer, what a snapshot keeps, and which
state `load` picks. Across a real crash: tests/e2e/test_supervision.py (bit-identical resume)."""

from __future__ import annotations

import os
import pickle
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
    assert [(f.rank, f.step) for f in snapshots.committed(where)] == [(0, 5)]
    got = checkpoint.load(tmp_path / "ckpt.pt")
    assert got["step"] == 5 and got["model"]["w"].tolist() == [5.0, 5.0, 5.0]
    assert got["note"] == [5, (5,)]
    assert checkpoint.loaded_from() == "the snapshot of step 5"


def test_a_newer_file_wins_and_makes_newer_snapshots_of_the_old_timeline_go(where, tmp_path):
    checkpoint.snapshot(state_at(3), step=3)
    checkpoint.save(state_at(7), tmp_path / "ckpt.pt")
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 7
    assert checkpoint.loaded_from() == str(tmp_path / "ckpt.pt")
    assert [f.step for f in snapshots.committed(where)] == [3]  # older: harmless, kept
    # Once a resume from step 7 is chosen (the ranks agreed on it), a snapshot of step 9 left
    # on this node is another timeline's: it goes, so that no later load can pick it.
    checkpoint.snapshot(state_at(9), step=9)
    assert [f.step for f in snapshots.committed(where)] == [3, 9]
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy is CUDA's")
def test_while_a_cuda_copy_is_in_flight_the_next_call_takes_none(where, monkeypatch):
    release = threading.Event()
    real_fill = snapshots._Slot.fill

    def slow_fill(self, *a, **k):
        release.wait(10)
        real_fill(self, *a, **k)

    monkeypatch.setattr(snapshots._Slot, "fill", slow_fill)
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    on_gpu = {"w": torch.ones(3, device="cuda")}
    assert taker.take(on_gpu, 1)
    assert taker.take(on_gpu, 2) is False  # returns at once, nothing taken
    release.set()
    taker.wait(10)
    assert (taker.taken, taker.skipped) == (1, 1)
    assert [f.step for f in snapshots.committed(where)] == [1]


def test_two_slots_per_writer_and_the_newest_stays_committed_while_the_next_is_written(where, monkeypatch):
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    for step in range(1, 5):
        assert taker.take(state_at(step), step)
    assert [f.step for f in snapshots.committed(where)] == [3, 4]
    assert sorted(os.listdir(where)) == ["node.slot-0", "node.slot-1"]  # no file per step
    seen_during_write: list[list[int]] = []
    real_views = snapshots._Slot.views

    def watching_views(self, *a, **k):
        seen_during_write.append([g.step for g in snapshots.committed(where)])
        return real_views(self, *a, **k)

    monkeypatch.setattr(snapshots._Slot, "views", watching_views)
    taker.take(state_at(5), 5)
    assert seen_during_write == [[4]]  # step 3's slot is being overwritten: not loadable
    assert [f.step for f in snapshots.committed(where)] == [4, 5]


def test_a_writer_killed_mid_copy_leaves_a_slot_that_never_loads_and_the_previous_one(where, tmp_path):
    """A child process dies (os._exit) after the first of two tensors reached the slot."""
    code = (
        "import os, torch\n"
        "from ddp_launch import snapshots\n"
        "t = snapshots.Snapshotter(__import__('pathlib').Path(os.environ['W']), 0, 0, 1)\n"
        "for step in (1, 2):\n"
        "    t.take({'a': torch.full((4,), float(step)), 'b': torch.full((4,), float(step))}, step)\n"
        "real = snapshots._Slot.views\n"
        "class Die:\n"
        "    def copy_(self, src): os._exit(9)\n"
        "snapshots._Slot.views = lambda self, *a: [real(self, *a)[0], Die()]\n"
        "t.take({'a': torch.full((4,), 3.0), 'b': torch.full((4,), 3.0)}, 3)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "W": str(where)}, timeout=60)
    assert child.returncode == 9
    assert [f.step for f in snapshots.committed(where)] == [2]  # step 1's slot was torn by 3
    got = checkpoint.load(tmp_path / "none.pt")
    assert got["a"].tolist() == got["b"].tolist() == [2.0] * 4


def test_every_dense_tensor_comes_back_bit_identical_and_a_layout_change_grows_the_slot(where, tmp_path):
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    wide = torch.randn(6, 5)
    state = {
        "bf16": torch.randn(7).to(torch.bfloat16),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "strided": wide.t(),  # not contiguous: kept by value, in its own shape
        "flags": torch.tensor([True, False]),
        "plain": {"lr": 0.1, "name": "sgd", "blob": b"\x00\x01", "none": None, "pair": (1, 2.5)},
    }
    assert taker.take(state, 1)
    got = checkpoint.load(tmp_path / "none.pt")
    for key in ("bf16", "scalar", "empty", "strided", "flags"):
        assert got[key].dtype == state[key].dtype and got[key].shape == state[key].shape
        assert torch.equal(got[key], state[key]), key
    assert got["plain"] == state["plain"]
    assert taker.take({"w": torch.arange(100_000, dtype=torch.float64)}, 2)  # more than slot 1 held
    assert taker.take({"w": torch.arange(200_000, dtype=torch.float64)}, 3)  # more than either
    assert checkpoint.load(tmp_path / "none.pt")["w"].tolist() == list(map(float, range(200_000)))


def test_a_value_that_is_not_plain_is_refused_naming_where_it_is(where):
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    with pytest.raises(TypeError, match=r"state\['opt'\]\['sched'\] is a object; a snapshot keeps"):
        taker.take({"opt": {"sched": object()}}, 1)
    assert snapshots.committed(where) == []


def test_a_structure_that_names_other_code_is_never_unpickled(where):
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    taker.take({"w": torch.ones(2)}, 1)
    slot = taker.slots(False)[0]
    evil = pickle.dumps((os.system, ()))  # a global that a plain pickle.load would call
    at = int(slot.header[6])
    slot.raw[at : at + len(evil)] = list(evil)
    slot.header[7] = len(evil)
    with pytest.raises(pickle.UnpicklingError, match="may not hold"):
        snapshots.read(where, 1, 0, sharded=False)


def test_a_full_memory_filesystem_skips_the_snapshot_with_one_line(where, monkeypatch, capsys):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
    assert taker.take(state_at(1), 1) is False
    assert taker.take(state_at(2), 2) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[ddp-launch] snapshot of step 1 not kept: [Errno 28] No space left on device"]
    assert snapshots.committed(where) == []


def test_replicated_state_is_kept_once_per_node_sharded_state_by_every_rank(where):
    other = snapshots.Snapshotter(where, rank=1, local_rank=1, world_size=2)
    assert other.take(state_at(3), 3)  # local rank 0's copy serves it
    assert snapshots.committed(where) == []
    assert other.take(state_at(3), 3, sharded=True)
    assert [(f.rank, f.step) for f in snapshots.committed(where)] == [(1, 3)]
    assert snapshots.loadable_steps(where, 1, 2, sharded=True) == {3}
    assert snapshots.loadable_steps(where, 0, 2, sharded=True) == set()  # not rank 0's shard
    assert snapshots.loadable_steps(where, 1, 4, sharded=True) == set()  # another world
    assert snapshots.loadable_steps(where, 0, 2, sharded=False) == set()  # a shard is not the state
    first = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=2)
    assert first.take(state_at(4), 4)
    assert snapshots.loadable_steps(where, 1, 2, sharded=False) == {4}  # every rank of the node


def test_a_killed_launchers_directory_is_removed_by_the_next_one_a_live_ones_kept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    shm = tmp_path / "shm"
    dead = shm / f"ddp-launch-run-a-{int(gone.stdout)}"
    live = shm / f"ddp-launch-run-b-{os.getpid()}"
    other = shm / "someone-else-1"
    for d in (dead, live, other):
        (d / "inner").mkdir(parents=True)
    snapshots.remove_abandoned(shm)
    assert sorted(p.name for p in shm.iterdir()) == sorted([live.name, other.name])


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
    checkpoint.save(state_at(2), tmp_path / "ckpt.pt")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")  # one node: every rank sees the same ones
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 6
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 2
    assert snapshots.committed(where) == []  # step 6 is the timeline that was not kept


def test_the_budget_keeps_every_step_when_cheap_and_spaces_them_by_powers_of_two_when_not(where):
    now = [0.0]
    taker = snapshots.Snapshotter(
        where, rank=0, local_rank=0, world_size=1, clock=lambda: now[0], cpu_clock=lambda: now[0]
    )
    built: list[int] = []

    def run(steps: range, loop_s: float, snapshot_s: float) -> list[bool]:
        out = []
        for step in steps:
            now[0] += loop_s  # the script's own step

            def state(step: int = step) -> dict:
                built.append(step)
                now[0] += snapshot_s  # what building and copying it costs
                return state_at(step)

            out.append(taker.take(state, step, budget=0.1))
        return out

    assert all(run(range(1, 6), loop_s=0.010, snapshot_s=0.0005))  # 5% of a step: within
    assert taker.every == 1
    run(range(6, 8), loop_s=0.010, snapshot_s=0.003)  # 30%: a snapshot every 4th step fits
    assert taker.every == 4
    built.clear()
    kept = run(range(8, 17), loop_s=0.010, snapshot_s=0.003)
    assert [s for s, k in zip(range(8, 17), kept, strict=True) if k] == [8, 12, 16]
    assert built == [8, 12, 16]  # a function as the state: the steps passed over built none
    assert taker.thinned == 6 + 1  # step 7, then 9-11 and 13-15
    assert [f.step for f in snapshots.committed(where)] == [12, 16]
    assert taker.take(state_at(17), 17, budget=None)  # no budget: every call's


def test_the_budget_counts_the_cpu_a_snapshot_takes_not_the_time_others_ran(where):
    wall, cpu = [0.0], [0.0]
    taker = snapshots.Snapshotter(
        where, rank=0, local_rank=0, world_size=1, clock=lambda: wall[0], cpu_clock=lambda: cpu[0]
    )
    for step in range(1, 5):
        wall[0] += 0.010  # the step
        cpu[0] += 0.010

        def state(step: int = step) -> dict:
            wall[0] += 0.005  # in the call: 0.5 ms of its own CPU, 4.5 ms of other ranks'
            cpu[0] += 0.0005
            return state_at(step)

        assert taker.take(state, step, budget=0.1)
    assert taker.every == 1
