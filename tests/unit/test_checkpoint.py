"""ddp_launch.checkpoint: round trips, and the last good checkpoint surviving a failed or killed save."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ddp_launch import checkpoint


class Opaque:
    """A plain Python object: what a weights-only load must refuse to unpickle."""

    def __init__(self, value: int) -> None:
        self.value = value


def _good_state() -> dict:
    return {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(4)}, "step": 7, "lr": 0.05}


def _assert_good_state(state: dict) -> None:
    assert state["step"] == 7
    assert state["lr"] == 0.05
    assert torch.equal(state["model"]["w"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(state["model"]["b"], torch.zeros(4))


def _visible_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"

    returned = checkpoint.save(_good_state(), path)

    assert returned == path
    _assert_good_state(checkpoint.load(path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"], "no temporary file may stay behind"


def test_save_accepts_str_and_creates_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt.pt"

    checkpoint.save(_good_state(), str(path))

    _assert_good_state(checkpoint.load(str(path)))


def test_save_replaces_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1}, path)

    checkpoint.save({"step": 2}, path)

    assert checkpoint.load(path) == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_load_of_a_missing_file_returns_none(tmp_path):
    assert checkpoint.load(tmp_path / "nothing-yet.pt") is None
    assert checkpoint.load(tmp_path / "no" / "such" / "dir" / "ckpt.pt") is None


def test_optimizer_state_round_trips_with_weights_only(tmp_path):
    # What a resume needs: SGD's momentum buffers come back exactly, under the safe default.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}, tmp_path / "c.pt")

    state = checkpoint.load(tmp_path / "c.pt")
    restored = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.5, momentum=0.0)
    restored.load_state_dict(state["optimizer"])

    assert restored.param_groups[0]["lr"] == 0.1
    assert restored.param_groups[0]["momentum"] == 0.9
    for before, after in zip(optimizer.state.values(), restored.state.values(), strict=True):
        assert torch.equal(before["momentum_buffer"], after["momentum_buffer"])


def test_weights_only_refuses_arbitrary_objects_unless_asked(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"obj": Opaque(3)}, path)

    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        checkpoint.load(path)
    assert checkpoint.load(path, weights_only=False)["obj"].value == 3


def test_map_location_moves_tensors(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"w": torch.ones(2)}, path)

    state = checkpoint.load(path, map_location="meta")

    assert state["w"].device.type == "meta"


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(_good_state(), path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        checkpoint.save({"step": 8}, path)
    monkeypatch.undo()

    _assert_good_state(checkpoint.load(path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"], "the temporary file must be removed"


def test_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    # The order is the whole point: fsync the data, rename, then fsync the directory.
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save({"step": 1}, tmp_path / "ckpt.pt")

    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_save_leaves_the_temporary_files_of_live_writers_alone(tmp_path):
    path = tmp_path / "ckpt.pt"
    live_writer = tmp_path / f".ckpt.pt.tmp-{os.getppid()}"  # our parent: certainly alive
    live_writer.write_bytes(b"being written")

    checkpoint.save({"step": 1}, path)

    assert live_writer.read_bytes() == b"being written"


_CRASHING_SAVER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from ddp_launch import checkpoint

    path, how = sys.argv[1], sys.argv[2]
    checkpoint.save({"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(4)},
                     "step": 7, "lr": 0.05}, path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.fsync(f.fileno())
        if how == "exit":
            os._exit(1)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    checkpoint.save({"step": 8}, path)
    sys.exit(3)  # unreachable: the save above never returns
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_process_dying_mid_save_keeps_the_previous_checkpoint(tmp_path, how):
    path = tmp_path / "ckpt.pt"
    package_root = Path(checkpoint.__file__).parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))

    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_SAVER, str(path), how],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )

    expected_rc = 1 if how == "exit" else -signal.SIGKILL
    assert proc.returncode == expected_rc, proc.stderr
    _assert_good_state(checkpoint.load(path))
    # The dead process's temporary file may remain, but hidden and not named like a checkpoint.
    assert _visible_files(tmp_path) == ["ckpt.pt"]
    assert [p.name for p in tmp_path.glob("*.pt")] == ["ckpt.pt"]

    checkpoint.save({"step": 9}, path)  # the writer is dead: its leftover goes with the next save

    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert checkpoint.load(path) == {"step": 9}
