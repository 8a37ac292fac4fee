"""In-memory snapshots of a training script's state, which outlive its worker's death.

`ddp_launch.checkpoint.snapshot` and `load` are the script's API; this module is the
machinery under them. The node's launcher makes a directory in memory (tmpfs, /dev/shm) for
the run, names it in ``DDP_LAUNCH_SNAPSHOT_DIR``, keeps it across generations and removes it
when the run ends. In it each writer has two **slot files**, reserved once and mapped into
the worker, and overwritten in place, one snapshot each:

- **Cheap**: a snapshot is one memcpy of the tensors into the slot's mapped memory, plus a
  small pickle of the structure (the nest of dicts and plain values, each tensor a `_Leaf`).
  No file is created, renamed or removed per step, and no torch.save runs. On CPU the copy
  happens in the call (it must: the script's next step changes the tensors in place); for
  CUDA tensors it is an asynchronous copy into pinned memory, and a thread fills the slot
  once it is done. While that is still in flight the next call returns False without one,
  so calling it every step never waits on the copy.
- **Within a budget**: `Snapshotter.take` keeps only every 2nd, 4th, ... step when one
  snapshot costs more than its share of a step (3% by default, `checkpoint.snapshot`).
- **Never torn**: a slot's header is marked "writing" before its first byte changes, and
  "committed" with the step only after the last; a worker killed in between leaves a slot
  that nothing loads, and the other slot still holds the previous snapshot.
- **Bounded**: two slots per writer, the newer one never overwritten.
- **One per node** for replicated (DDP) state: only local rank 0 writes (slots
  ``node.slot-<k>``) and every rank of the node loads them. Sharded state (FSDP2) keeps
  each rank's own shard (``rank-<r>.slot-<k>``), for a world of the same size.

A slot outlives its writer but not its node's launcher: a lost node takes its snapshots with
it. The header is eight native int64s (see `_Header`); the tensors follow at 64-byte
aligned offsets, then the pickled structure.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

SNAPSHOT_DIR_ENV = "DDP_LAUNCH_SNAPSHOT_DIR"
_NAME = re.compile(r"^(?:node|rank-(\d+))\.slot-([01])$")
_MAGIC = 0x3150414E53504444  # b"DDPSNAP1", little-endian
_EMPTY, _WRITING, _COMMITTED = 0, 1, 2
_DATA_AT = 4096  # the header's page; tensors start on the next
_ALIGN = 64
_HEADER = struct.Struct("=8q")
_MOST_APART = 1024  # the budget never spaces snapshots further apart than this many steps
# The plain values a snapshot keeps beside its tensors: what a state_dict() holds.
_PLAIN = (int, float, bool, str, bytes, complex, type(None))


class _Header(NamedTuple):
    magic: int
    state: int  # _EMPTY, _WRITING or _COMMITTED
    step: int
    world_size: int
    rank: int
    sharded: int
    data_end: int  # where the pickled structure starts
    structure_len: int


class _Leaf(NamedTuple):
    """A tensor's place in the pickled structure: its index in the table of tensors."""

    at: int


@dataclass(frozen=True)
class Found:
    """A committed snapshot: a slot file and its header."""

    path: Path
    rank: int
    step: int
    world_size: int
    sharded: bool


def make_directory(run_id: str, fallback: Path) -> Path:
    """The node's snapshot directory for a run, made by its launcher: in memory (/dev/shm)
    where there is one, else `fallback`/snapshots (on disk, slower but as safe)."""
    shm = Path("/dev/shm")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:100]
    where = shm / f"ddp-launch-{safe}-{os.getpid()}" if shm.is_dir() and os.access(shm, os.W_OK) else None
    if where is not None:
        remove_abandoned(shm)
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


def remove_abandoned(shm: Path) -> None:
    """Snapshot directories of this user's launchers that are gone (SIGKILLed: they could
    not remove their own). They hold memory until removed; the next run on the node does."""
    try:
        entries = list(os.scandir(shm))
    except OSError:
        return
    for entry in entries:
        head, _, pid = entry.name.rpartition("-")
        if not head.startswith("ddp-launch-") or not pid.isdigit():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_dir(follow_symlinks=False):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:  # alive (someone else's, EPERM) or vanished meanwhile
            continue


def directory(environ: Any = None) -> Path | None:
    """The node's snapshot directory, or None outside ddp-launch (snapshots are then off)."""
    environ = os.environ if environ is None else environ
    value = environ.get(SNAPSHOT_DIR_ENV, "")
    return Path(value) if value else None


def _read_header(path: Path) -> _Header | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEADER.size)
    except OSError:
        return None
    if len(raw) < _HEADER.size:
        return None
    header = _Header(*_HEADER.unpack(raw))
    return header if header.magic == _MAGIC else None


def committed(where: Path) -> list[Found]:
    """The committed snapshots in `where`, oldest step first."""
    found = []
    try:
        names = os.listdir(where)
    except OSError:
        return []
    for name in names:
        if not _NAME.match(name):
            continue
        h = _read_header(where / name)
        if h is not None and h.state == _COMMITTED:
            found.append(Found(where / name, h.rank, h.step, h.world_size, bool(h.sharded)))
    return sorted(found, key=lambda f: (f.step, f.rank, f.path.name))


def invalidate(found: Found) -> None:
    """Make a committed snapshot unloadable, in place (its writer may have the slot mapped)."""
    try:
        fd = os.open(found.path, os.O_WRONLY)
    except OSError:
        return
    try:
        os.pwrite(fd, struct.pack("=q", _EMPTY), 8)
    finally:
        os.close(fd)


def _flatten(state: Any) -> tuple[Any, list[Any]]:
    """`state`'s structure with every tensor replaced by a `_Leaf`, and the tensors in order.
    Raises TypeError, naming where, for a value that is neither a tensor nor plain. Called
    every step: no work per value beyond the walk itself."""
    import torch

    leaves: list[Any] = []
    tensor, strided = torch.Tensor, torch.strided

    def walk(value: Any) -> Any:
        if isinstance(value, tensor):
            if type(value) is not tensor and hasattr(value, "to_local"):
                value = value.to_local()  # a DTensor (FSDP2): this rank's shard is what it holds
            if value.layout is not strided:
                raise _NotKept(value, f"is {value.layout}; only dense tensors are kept")
            leaves.append(value)
            return _Leaf(len(leaves) - 1)
        if isinstance(value, dict):  # state_dict()s are OrderedDicts: the type is kept
            items = [(k, walk(v)) for k, v in value.items()]
            return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple([walk(v) for v in value])
        if isinstance(value, _PLAIN):
            return value
        raise _NotKept(
            value,
            f"is a {type(value).__name__}; a snapshot keeps tensors, dicts, lists, tuples and plain "
            "values (numbers, strings, bytes, None)",
        )

    try:
        return walk(state), leaves
    except _NotKept as e:
        raise TypeError(f"snapshot: {_path_to(state, e.value) or 'the state'} {e.why}") from None


class _NotKept(Exception):
    def __init__(self, value: Any, why: str) -> None:
        self.value, self.why = value, why


def _path_to(state: Any, target: Any, at: str = "state") -> str | None:
    """Where `target` sits in `state`, as ``state['a'][0]`` (for the message only)."""
    if state is target:
        return at
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list | tuple) else ()
    for k, v in items:
        found = _path_to(v, target, f"{at}[{k!r}]")
        if found:
            return found
    return None


def _layout(leaves: list[Any]) -> tuple[list[tuple[int, int]], int]:
    """Each tensor's (offset, nbytes) in a slot, and where the data ends."""
    spans, at = [], _DATA_AT
    for t in leaves:
        n = t.numel() * t.element_size()
        spans.append((at, n))
        at += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    return spans, at


class _Slot:
    """One slot file, mapped into this process (shared: what is written is the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.bytes: Any = None  # a uint8 tensor over the mapping: the tensors' views
        self.raw: Any = None  # the same memory as a numpy array: the header and structure
        self.header: Any = None  # int64 view of the header
        self._views: tuple[Any, list[Any]] | None = None  # (layout key, tensor views)

    def step(self) -> int:
        """The committed step in this slot, -1 when none."""
        if self.header is not None:
            h = self.header
            return int(h[2]) if h[0] == _MAGIC and h[1] == _COMMITTED else -1
        found = _read_header(self.path)
        return found.step if found is not None and found.state == _COMMITTED else -1

    def reserve(self, nbytes: int) -> None:
        """Map at least `nbytes`, growing the file first. The space is allocated here
        (posix_fallocate), so a full tmpfs is an OSError now, not a SIGBUS mid-copy."""
        import numpy as np
        import torch

        if nbytes <= self.size:
            return
        size = max(nbytes, self.size * 5 // 4)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        storage: Any = torch.UntypedStorage.from_file(str(self.path), shared=True, nbytes=size)
        self.bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
        self.raw = self.bytes.numpy()
        self.header = self.raw[: _HEADER.size].view(np.int64)
        self.size = size
        self._views = None

    def views(self, leaves: list[Any], spans: list[tuple[int, int]]) -> list[Any]:
        """Tensors over the slot shaped like `leaves`, kept while the layout stays."""
        key = [(t.dtype, t.shape) for t in leaves]
        if self._views is None or self._views[0] != key:
            made = [
                self.bytes[at : at + n].view(t.dtype).view(t.shape) for t, (at, n) in zip(leaves, spans, strict=True)
            ]
            self._views = (key, made)
        return self._views[1]

    def fill(
        self, sources: list[Any], spans: list[tuple[int, int]], data_end: int, structure: bytes, meta: tuple
    ) -> None:
        """Write one snapshot: marked writing, the tensors, the structure, then committed."""
        import numpy as np
        import torch

        h = self.header
        h[1] = _WRITING  # from here until the commit below, nothing loads this slot
        with torch.no_grad():
            for view, t in zip(self.views(sources, spans), sources, strict=True):
                view.copy_(t)
        self.raw[data_end : data_end + len(structure)] = np.frombuffer(structure, dtype=np.uint8)
        step, world_size, rank, sharded = meta
        h[0], h[2], h[3], h[4], h[5], h[6], h[7] = _MAGIC, step, world_size, rank, sharded, data_end, len(structure)
        h[1] = _COMMITTED  # the commit: one aligned 8-byte store, after every other


class Snapshotter:
    """One worker's snapshots (see the module docstring)."""

    def __init__(
        self,
        where: Path,
        rank: int,
        local_rank: int,
        world_size: int,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.where = where
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self._clock = clock
        # A snapshot's cost is the CPU time this thread spends in it: on a machine with more
        # ranks than cores the wall time in the call also counts the time others ran.
        self._cpu_clock = cpu_clock
        self.every = 1  # the budget's spacing: a snapshot of every step that is a multiple
        self._loop_s: float | None = None  # the script's own time between calls (smoothed)
        self._returned_at: float | None = None
        self._slots: dict[bool, list[_Slot]] = {}
        self._writer: threading.Thread | None = None
        self._staging: tuple[Any, list[Any]] | None = None  # CUDA: pinned host copies
        self.taken = 0  # snapshots committed
        self.skipped = 0  # calls that found a copy still in flight
        self.thinned = 0  # calls the budget passed over
        self.error: BaseException | None = None  # the last failure to write one, if any

    def slots(self, sharded: bool) -> list[_Slot]:
        if sharded not in self._slots:
            stem = f"rank-{self.rank}" if sharded else "node"
            self._slots[sharded] = [_Slot(self.where / f"{stem}.slot-{k}") for k in (0, 1)]
        return self._slots[sharded]

    def take(self, state: Any, step: int, *, sharded: bool = False, budget: float | None = None) -> bool:
        """Snapshot `state` (or what the function `state` returns) at `step`. False when
        none was taken: a copy still in flight, or a step the budget passes over.

        `budget` is the share of the loop's time snapshots may take. After each snapshot,
        its cost (this thread's CPU time in the call) against the script's own time per call
        (the wall time between calls) sets `every`, the smallest power of
        two such that one snapshot every `every` steps stays within it; only steps that are
        multiples of it are kept. A power of two, so that ranks whose costs differ a little
        still share their steps (a multiple of 4 is one of 2), and a step number, not a
        clock, so that every rank of a node or a world keeps the same steps.
        """
        if not sharded and self.local_rank != 0:
            return True  # replicated state: local rank 0's copy serves the whole node
        began, began_cpu = self._clock(), self._cpu_clock()
        if self._returned_at is not None:
            gap = began - self._returned_at
            self._loop_s = gap if self._loop_s is None else 0.8 * self._loop_s + 0.2 * gap
        try:
            if budget and step % self.every:
                self.thinned += 1
                return False
            if self._writer is not None and self._writer.is_alive():
                self.skipped += 1
                return False
            taken = self._take(state() if callable(state) else state, step, sharded)
            if taken and budget and self._loop_s:
                cost, every = self._cpu_clock() - began_cpu, 1
                while cost > budget * every * self._loop_s and every < _MOST_APART:
                    every *= 2
                self.every = every
            return taken
        finally:
            self._returned_at = self._clock()

    def _take(self, state: Any, step: int, sharded: bool) -> bool:
        structure, leaves = _flatten(state)
        # The slot without the newest snapshot; the newest stays loadable meanwhile.
        slot = min(self.slots(sharded), key=lambda s: s.step())
        spans, data_end = _layout(leaves)
        blob = pickle.dumps((structure, [(str(t.dtype), tuple(t.shape)) for t in leaves]), protocol=5)
        meta = (step, self.world_size, self.rank, int(sharded))
        try:
            slot.reserve(data_end + len(blob))
            if any(t.is_cuda for t in leaves):
                self._copy_from_cuda(slot, leaves, spans, data_end, blob, meta)
                return True
            slot.fill(leaves, spans, data_end, blob, meta)
        except OSError as e:
            self._failed(e, step)
            return False
        self.taken += 1
        return True

    def _copy_from_cuda(
        self, slot: _Slot, leaves: list[Any], spans: list, data_end: int, blob: bytes, meta: tuple
    ) -> None:
        import torch

        key = [(t.dtype, t.shape) for t in leaves]
        if self._staging is None or self._staging[0] != key:
            pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in leaves]
            self._staging = (key, pinned)
        host = self._staging[1]
        for dst, t in zip(host, leaves, strict=True):
            dst.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def write() -> None:
            try:
                done.synchronize()
                slot.fill(host, spans, data_end, blob, meta)
                self.taken += 1
            except BaseException as e:  # the script goes on, without this snapshot
                self._failed(e, meta[0])

        self._writer = threading.Thread(target=write, name="ddp-launch-snapshot", daemon=True)
        self._writer.start()

    def _failed(self, error: BaseException, step: int) -> None:
        if self.error is None:  # once: a full /dev/shm would otherwise say it every step
            print(f"[ddp-launch] snapshot of step {step} not kept: {error}", file=sys.stderr, flush=True)
        self.error = error

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the copy in flight (if any) is committed."""
        if self._writer is not None:
            self._writer.join(timeout_s)


def loadable_steps(where: Path, rank: int, world_size: int, *, sharded: bool) -> set[int]:
    """The steps this rank could resume from on this node: the node's for replicated state,
    its own rank's of the same world for sharded state."""
    return {
        f.step
        for f in committed(where)
        if f.sharded == sharded and (not sharded or (f.rank == rank and f.world_size == world_size))
    }


class _Unpickler(pickle.Unpickler):
    """The structure holds containers, plain values and `_Leaf`s: nothing else may load."""

    _ALLOWED = {("collections", "OrderedDict"), (__name__, "_Leaf")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a snapshot may not hold {module}.{name}")


def read(where: Path, step: int, rank: int, *, sharded: bool, map_location: Any = "cpu") -> Any:
    """The state of the snapshot at `step` (this rank's own for sharded state), copied out of
    the slot: the tensors returned are the caller's, whatever is written next."""
    for f in committed(where):
        if f.step != step or f.sharded != sharded or (sharded and f.rank != rank):
            continue
        state = _read_slot(f.path, step)
        if state is not None:
            return _to(state, map_location)
    raise FileNotFoundError(f"no snapshot of step {step} in {where}")


def _read_slot(path: Path, step: int) -> Any | None:
    import torch

    with open(path, "rb") as f:
        h = _Header(*_HEADER.unpack(f.read(_HEADER.size)))
        f.seek(h.data_end)
        structure, table = _Unpickler(io.BytesIO(f.read(h.structure_len))).load()
        tensors = []
        at = _DATA_AT
        for dtype_name, shape in table:
            t = torch.empty(shape, dtype=getattr(torch, dtype_name.removeprefix("torch.")))
            n = t.numel() * t.element_size()
            if n:
                f.seek(at)
                f.readinto(cast(Any, t.reshape(-1).view(torch.uint8).numpy()))
            tensors.append(t)
            at += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    after = _read_header(path)  # written meanwhile (never while its writer lives): not this one
    if after is None or after.state != _COMMITTED or after.step != step:
        return None

    return _tree_map(structure, lambda value: tensors[value.at] if isinstance(value, _Leaf) else value)


def _tree_map(value: Any, fn: Callable[[Any], Any]) -> Any:
    """`value` rebuilt with `fn` applied to everything that is not a dict, list or tuple
    (a `_Leaf` is a tuple, and a leaf)."""
    if isinstance(value, dict):
        return type(value)((k, _tree_map(v, fn)) for k, v in value.items())
    if isinstance(value, list):
        return [_tree_map(v, fn) for v in value]
    if isinstance(value, tuple) and not isinstance(value, _Leaf):
        return tuple(_tree_map(v, fn) for v in value)
    return fn(value)


def _to(state: Any, map_location: Any) -> Any:
    """Tensors moved as torch.load's `map_location` would (a device or its name; None or
    "cpu" leaves them on the CPU, where they were read)."""
    if map_location is None or map_location == "cpu":
        return state
    import torch

    return _tree_map(state, lambda value: value.to(map_location) if isinstance(value, torch.Tensor) else value)
