"""Atomic checkpoints for training scripts, in the worker.

A restart resumes from whatever is at the checkpoint path, so that file must always be a
complete checkpoint: either the previous one or the new one, never half of either, even when
the process dies (exception, ``os._exit``, SIGKILL, a node losing power) in the middle of a save.
`save` writes a hidden temporary file beside the target, makes it durable, and renames it over
the target in one step; `load` returns ``None`` when there is nothing to resume from.

Usage::

    from ddp_launch import checkpoint

    state = checkpoint.load("ckpt/last.pt")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
    ...
    if rank == 0:
        checkpoint.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
            "ckpt/last.pt",
        )

Both functions work the same under ddp-launch, torchrun or plain ``python``. torch is imported
inside them so that ``import ddp_launch`` stays cheap for code that never touches a checkpoint.

**Snapshots** lose a step or a few to a crash, at the cost of a copy in memory::

    state = checkpoint.load("ckpt/last.pt")       # the newest: a snapshot or the file
    for step in range(start, steps):
        train_step()
        checkpoint.snapshot(lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "step": step + 1}, step=step + 1)
        if end_of_epoch and rank == 0:
            checkpoint.save(..., "ckpt/last.pt")  # durable: survives the node, the job

`snapshot` costs a memcpy; the node's launcher holds the copies in memory (see
`ddp_launch.snapshots`), so they outlive a worker's death but not the run. Under torchrun or
plain ``python`` it does nothing, and `load` reads the file, as before.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from ddp_launch import snapshots

__all__ = ["load", "loaded_from", "save", "snapshot", "snapshot_counts"]

StrPath = str | os.PathLike[str]


def _temp_path(path: StrPath, pid: int | None = None) -> Path:
    """The temporary file that `save` writes before it renames it onto ``path``.

    Hidden (leading dot) and with a ``.tmp-<pid>`` suffix so that neither a person nor a
    ``*.pt`` glob mistakes it for a checkpoint; the pid keeps concurrent writers apart and
    says which process left it behind if that process was killed mid-save.

    Args:
        path: The checkpoint path.
        pid: The writing process; the current process by default.

    Returns:
        ``<dir>/.<name>.tmp-<pid>``, in the same directory as ``path``.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def save(state: Any, path: StrPath) -> Path:
    """Write ``state`` to ``path`` with `torch.save`, atomically.

    The previous file at ``path``, if any, stays complete and loadable until the new one has
    fully reached the disk; then a rename replaces it. If ``torch.save`` (or anything after it)
    raises, the temporary file is removed and ``path`` is untouched. A process killed in the
    middle can leave its temporary file (see `_temp_path`) behind, but never a broken ``path``;
    the next save on the same machine deletes it once that process is gone.

    Call it from one rank only (usually rank 0): two processes saving to the same path do not
    corrupt it, but the last rename wins.

    Args:
        state: Anything `torch.save` accepts, typically a dict of ``state_dict()``s and counters.
        path: Where the checkpoint goes; missing parent directories are created.

    Returns:
        ``path`` as a `pathlib.Path`.

    Raises:
        OSError: The directory cannot be created or the file cannot be written.
        Exception: Whatever `torch.save` raises for ``state`` (e.g. an unpicklable object).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_temps(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            # Without this, the rename below can reach the disk before the data does, and a
            # power loss leaves an empty or truncated file under the checkpoint's name.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-save must not leave the temp file behind either.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _remove_orphaned_temps(path: Path) -> None:
    """Delete temporary files of this checkpoint left by writers that died mid-save (their
    pid is gone): a crash must not leave garbage beside the checkpoint for ever."""
    prefix = f".{path.name}.tmp-"
    for leftover in path.parent.glob(f"{prefix}*"):
        pid_text = leftover.name[len(prefix) :]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def load(path: StrPath, map_location: Any = "cpu", *, weights_only: bool = True, sharded: bool = False) -> Any | None:
    """The newest state to resume from: a snapshot of this run, or the checkpoint at ``path``.

    Under ddp-launch with snapshots taken (`snapshot`), it is the newest snapshot step that
    every rank of this generation can load (their nodes' snapshots; one agreement over
    torch.distributed, so call it after ``init_process_group``; without one, a run of several
    nodes resumes from the file), unless the file at ``path``
    holds a newer ``"step"``. Every rank then gets the same step. Otherwise it reads the file
    (written by `save` or by plain `torch.save`), as under torchrun.

    Args:
        path: The durable checkpoint path.
        map_location: Passed to `torch.load`. ``"cpu"`` by default, so that a checkpoint saved
            from ``cuda:0`` loads on any rank and on machines without a GPU; ``load_state_dict``
            then copies the tensors to wherever the model's parameters are.
        weights_only: Passed to `torch.load`. True restricts unpickling to tensors, primitive
            types and containers of them (all that model and optimizer state dicts and step
            counters need), so a checkpoint cannot run code when it is loaded. Set it to False
            only for checkpoints you trust that hold other Python objects.
        sharded: the snapshots hold each rank's own shard (FSDP2), as `snapshot` was told.

    Returns:
        The saved object, or ``None`` when there is nothing to resume from.

    Raises:
        OSError: ``path`` exists but cannot be read.
        Exception: Whatever `torch.load` raises for a file that is not a valid checkpoint.
    """
    import torch

    # Open rather than check for existence first, so a file that vanishes between the check
    # and the read still means "no checkpoint" rather than an error.
    try:
        with open(path, "rb") as f:
            durable = torch.load(f, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        durable = None
    global _loaded_from
    _loaded_from = None if durable is None else str(path)
    where = snapshots.directory()
    if where is None:
        return durable
    step = _agreed_snapshot_step(where, sharded=sharded)
    file_step = durable.get("step") if isinstance(durable, dict) else None
    # A file without a "step" cannot be compared: a snapshot of this run is then preferred.
    if step is None or (isinstance(file_step, int) and file_step >= step):
        _drop_snapshots_after(where, file_step if isinstance(file_step, int) else -1, sharded)
        return durable
    _drop_snapshots_after(where, step, sharded)
    rank = int(os.environ.get("RANK", "0"))
    state = snapshots.read(where, step, rank, sharded=sharded, map_location=map_location)
    _loaded_from = f"the snapshot of step {step}"
    return state


_loaded_from: str | None = None


def loaded_from() -> str | None:
    """Where the last `load` found its state: the file's path, ``"the snapshot of step N"``,
    or None when it found nothing."""
    return _loaded_from


DEFAULT_BUDGET = 0.03


def snapshot(state: Any, *, step: int, sharded: bool = False, budget: float | None = DEFAULT_BUDGET) -> bool:
    """Keep `state` (a ``state_dict()``-like nest of tensors and plain values, or a function
    that returns one) at `step` in the node's memory, so that a crash loses at most the
    steps since; call it after every optimizer step.

    It costs one copy of the tensors into memory the node's launcher owns: a memcpy in the
    call on CPU, an asynchronous copy from a GPU that a thread commits (while one is still
    in flight the next call takes none). Snapshots take at most `budget` of the loop's time
    (3% by default): when one costs more than that share of a step, only every 2nd, 4th, ...
    step is kept, the same steps on every rank. ``budget=None`` keeps every call's. Pass a
    function (``lambda: {...}``) so that the steps passed over do not even build the state.
    Replicated state (DDP) is kept once per node; with ``sharded=True`` (FSDP2's
    ``fully_shard``) every rank keeps its own shard. Outside ddp-launch it does nothing and
    returns False.

    Returns:
        Whether a snapshot was taken (or, for replicated state on a rank other than the node's
        first, left to that one).

    Raises:
        TypeError: the state holds something other than tensors, containers and plain values.
    """
    taker = _snapshotter()
    return False if taker is None else taker.take(state, step, sharded=sharded, budget=budget)


def snapshot_counts() -> dict[str, int] | None:
    """This process's snapshots so far: ``taken``, ``passed_over`` (by the budget),
    ``in_flight`` (calls that found a GPU copy still running) and ``every`` (the budget's
    spacing now, in steps); None when it takes none (outside ddp-launch, or not the node's
    first rank for replicated state)."""
    taker = _snapshotter()
    if taker is None or taker.taken + taker.thinned + taker.skipped == 0:
        return None
    return {"taken": taker.taken, "passed_over": taker.thinned, "in_flight": taker.skipped, "every": taker.every}


_taker: snapshots.Snapshotter | None = None
_taker_pid = 0


def _snapshotter() -> snapshots.Snapshotter | None:
    global _taker, _taker_pid
    if _taker is None or _taker_pid != os.getpid():
        where = snapshots.directory()
        if where is None or not where.is_dir():
            return None
        e = os.environ
        _taker = snapshots.Snapshotter(
            where, int(e.get("RANK", "0")), int(e.get("LOCAL_RANK", "0")), int(e.get("WORLD_SIZE", "1"))
        )
        _taker_pid = os.getpid()
    return _taker


def _agreed_snapshot_step(where: Path, *, sharded: bool) -> int | None:
    """The newest step every rank can load, agreed over torch.distributed when it runs."""
    e = os.environ
    rank, world = int(e.get("RANK", "0")), int(e.get("WORLD_SIZE", "1"))
    mine = snapshots.loadable_steps(where, rank, world, sharded=sharded)
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, sorted(mine))
        common = set(every[0]).intersection(*every[1:]) if every else set()
    elif int(e.get("GROUP_WORLD_SIZE", "1")) > 1:
        # Several nodes and no process group to agree over: each node holds other snapshots,
        # and ranks resuming from different steps would never meet again. The file it is.
        common = set()
    else:
        common = mine  # one node: every rank sees the same snapshots
    return max(common) if common else None


def _drop_snapshots_after(where: Path, step: int, sharded: bool) -> None:
    """A resume from `step` makes newer snapshots another timeline's: they must never be
    loaded later. Removed by the node's first rank (each rank its own when sharded)."""
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not sharded and local_rank != 0:
        return
    for f in snapshots.committed(where):
        if f.step > step and f.sharded == sharded and (not sharded or f.rank == rank):
            snapshots.invalidate(f)


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is; until then a power loss can bring
    # back the old name (still a good checkpoint, just an older one). Not every platform or
    # filesystem can fsync a directory, and there the rename is as durable as it gets.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)
