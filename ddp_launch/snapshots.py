"""In-memory snapshots of a training script's state, which outlive its worker's death.

`ddp_launch.checkpoint.snapshot` and `load` are the script's API; this module is the
machinery under them. The node's launcher makes a directory in memory (tmpfs, /dev/shm) for
the run, names it in ``DDP_LAUNCH_SNAPSHOT_DIR``, keeps it across generations and removes it
when the run ends. A snapshot is one file there, ``rank-<r>.step-<s>.pt``:

- **Consistent**: `take` copies the state's tensors first (a memcpy on CPU; an asynchronous
  device-to-host copy for CUDA tensors), so what is written is the state at that step
  whatever the script does next.
- **Asynchronous**: a thread serialises the copy and writes it; `take` returns at once, and
  while a write is still in flight the next `take` returns False without one, so calling it
  every step never waits for memory.
- **Never torn**: the thread writes a hidden temporary file and renames it to its name in
  one step; a worker killed mid-write leaves only the temporary file, which `newest` never
  returns (and removes once its writer is gone).
- **Bounded**: at most two snapshots per rank: the last one committed, and the one being
  written (the older committed one is removed before a write starts).
- **One per node** for replicated (DDP) state: only local rank 0 writes, every rank of the
  node can load it. Sharded state (FSDP2) keeps each rank's own shard, for the same world.

A snapshot lives as long as its node's launcher: a lost node takes its snapshots with it.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SNAPSHOT_DIR_ENV = "DDP_LAUNCH_SNAPSHOT_DIR"
_NAME = re.compile(r"^rank-(\d+)\.step-(\d+)\.pt$")


@dataclass(frozen=True)
class Found:
    """A committed snapshot file."""

    path: Path
    rank: int
    step: int


def make_directory(run_id: str, fallback: Path) -> Path:
    """The node's snapshot directory for a run, made by its launcher: in memory (/dev/shm)
    where there is one, else `fallback`/snapshots (on disk, slower but as safe)."""
    shm = Path("/dev/shm")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:100]
    where = shm / f"ddp-launch-{safe}-{os.getpid()}" if shm.is_dir() and os.access(shm, os.W_OK) else None
    for candidate in (where, fallback / "snapshots"):
        if candidate is None:
            continue
        try:
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
            return candidate
        except OSError:
            continue
    raise OSError(f"cannot make a snapshot directory under /dev/shm or {fallback}")


def remove_directory(where: Path) -> None:
    shutil.rmtree(where, ignore_errors=True)


def directory(environ: Any = None) -> Path | None:
    """The node's snapshot directory, or None outside ddp-launch (snapshots are then off)."""
    environ = os.environ if environ is None else environ
    value = environ.get(SNAPSHOT_DIR_ENV, "")
    return Path(value) if value else None


def committed(where: Path) -> list[Found]:
    """The committed snapshots in `where` (no temporary file), oldest step first."""
    found = []
    try:
        names = os.listdir(where)
    except OSError:
        return []
    for name in names:
        m = _NAME.match(name)
        if m:
            found.append(Found(where / name, int(m.group(1)), int(m.group(2))))
    return sorted(found, key=lambda f: (f.step, f.rank))


def _copy(state: Any) -> tuple[Any, list[Any]]:
    """A copy of `state` that the script's next steps cannot change: every tensor copied (to
    the CPU, asynchronously for CUDA tensors: the events to wait for are returned), plain
    values as they are (they are immutable or copied by pickling in the writer)."""
    import torch

    events: list[Any] = []

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                events.append(event)
                return host
            return t.clone()
        if isinstance(value, dict):  # state_dict()s are OrderedDicts: the type is kept
            items = [(k, copy(v)) for k, v in value.items()]
            try:
                return type(value)(items)
            except TypeError:
                return dict(items)
        if isinstance(value, list):
            return [copy(v) for v in value]
        if isinstance(value, tuple):
            return tuple(copy(v) for v in value)
        return value

    return copy(state), events


class Snapshotter:
    """One worker's snapshots (see the module docstring)."""

    def __init__(self, where: Path, rank: int, local_rank: int, world_size: int) -> None:
        self.where = where
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self._writer: threading.Thread | None = None
        self.taken = 0  # snapshots written
        self.skipped = 0  # calls that found a write still in flight
        self.error: BaseException | None = None  # the last write's failure, if any

    def take(self, state: Any, step: int, *, sharded: bool = False) -> bool:
        """Snapshot `state` at `step`; False when a write is still in flight (nothing taken)."""
        if not sharded and self.local_rank != 0:
            return True  # replicated state: local rank 0's copy serves the whole node
        if self._writer is not None and self._writer.is_alive():
            self.skipped += 1
            return False
        copy, events = _copy(state)
        meta = {"step": step, "world_size": self.world_size, "rank": self.rank, "sharded": sharded}
        self._writer = threading.Thread(
            target=self._write, args=(copy, events, meta), name="ddp-launch-snapshot", daemon=True
        )
        self._writer.start()
        return True

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the write in flight (if any) is done."""
        if self._writer is not None:
            self._writer.join(timeout_s)

    def _write(self, copy: Any, events: list[Any], meta: dict) -> None:
        import torch

        try:
            for event in events:
                event.synchronize()
            mine = [f for f in committed(self.where) if f.rank == self.rank]
            for old in mine[:-1]:  # keep the newest committed one while the next is written
                old.path.unlink(missing_ok=True)
            name = f"rank-{self.rank}.step-{meta['step']}.pt"
            tmp = self.where / f".{name}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                torch.save({**meta, "state": copy}, f)
            os.replace(tmp, self.where / name)  # the commit: before it, nothing to load
            for old in mine:
                if old.step != meta["step"]:
                    old.path.unlink(missing_ok=True)
            self.taken += 1
        except BaseException as e:  # a full tmpfs: the script goes on, without this snapshot
            self.error = e


def remove_orphans(where: Path) -> None:
    """Temporary files of writers that died mid-write (their pid is gone)."""
    try:
        names = os.listdir(where)
    except OSError:
        return
    for name in names:
        head, sep, pid = name.rpartition(".tmp-")
        if not sep or not pid.isdigit() or not head.startswith("."):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            (where / name).unlink(missing_ok=True)
        except PermissionError:
            pass


def loadable_steps(where: Path, rank: int, world_size: int, *, sharded: bool) -> set[int]:
    """The steps this rank could resume from on this node: any rank's for replicated state,
    its own rank's of the same world for sharded state."""
    steps = set()
    for f in committed(where):
        if not sharded or f.rank == rank:
            steps.add(f.step)
    if sharded:  # a shard is only this rank's in a world of the same size
        steps = {s for s in steps if _world_of(where, rank, s) == world_size}
    return steps


def _world_of(where: Path, rank: int, step: int) -> int | None:
    import torch

    try:
        meta = torch.load(where / f"rank-{rank}.step-{step}.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None
    return meta.get("world_size")


def read(where: Path, step: int, rank: int, *, sharded: bool, map_location: Any, weights_only: bool) -> Any:
    """The state of the snapshot at `step` (this rank's own for sharded state)."""
    import torch

    candidates = [f for f in committed(where) if f.step == step and (not sharded or f.rank == rank)]
    for f in sorted(candidates, key=lambda f: (f.rank != rank, f.rank)):
        try:
            with open(f.path, "rb") as fh:
                return torch.load(fh, map_location=map_location, weights_only=weights_only)["state"]
        except FileNotFoundError:  # replaced by a newer one meanwhile
            continue
    raise FileNotFoundError(f"no snapshot of step {step} in {where}")
