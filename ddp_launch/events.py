"""The run's event log, ``<run-dir>/events.jsonl``: what happened during a run, one JSON object
per line, written and flushed as it happens, readable with nothing but ``json``.

The launcher writes the run-level events itself with `EventLog.emit`; `EventLog.observe`
turns the registry's snapshots (a few a second) into the per-rank events by diffing each
snapshot with the previous one. The file grows with time and with events, never with the
heartbeat rate times the number of ranks: progress is sampled once every
``progress_interval_s`` (plus one sample after ranks end), and a world larger than
``per_rank_limit`` ranks (64) gets one aggregate per sample instead of one entry per rank.

Every line has ``v`` (the schema version, `SCHEMA_VERSION`), ``t`` (unix time, seconds,
3 decimals) and ``event`` (one of `EVENT_KINDS`), then the fields of its kind:

=================  =========================================================================
event              fields (``?``: optional; ``|null``: may be null)
=================  =========================================================================
run_start          run_id: str, config: object, world_size: int, nnodes: int,
                   nproc_per_node: int, versions: object {python, torch?, ddp_launch, grpc},
                   host: str
register           rank, node_rank, pid, generation: int, hostname: str, local_rank?: int
barrier_open       generation, world_size: int
state              rank, generation: int, state, previous: str (RankState values; hung,
                   failed and done are recorded, starting, waiting and training are not;
                   previous is the state last observed), step?: int, exit_code?: int|null
straggler          rank, generation: int, steps_per_s: number,
                   median_steps_per_s: number|null, step?: int
straggler_cleared  rank, generation: int, steps_per_s?: number|null
progress           generation: int, elapsed_s: number, world_size?: int, and either
                   ranks: [sample, ...] (every registered rank, worlds of <= 64 ranks) or
                   aggregate: {ranks: int, step, steps_per_s: {min, median, max},
                   loss: {min, median, max}|null, rss_bytes_max: int,
                   heartbeat_age_s_max: number|null} with slowest: [sample, ...] (up to 8,
                   slowest first), where sample = {rank: int, step: int,
                   steps_per_s: number, loss: number|null, samples: int, rss_bytes: int,
                   cpu_percent: number, heartbeat_age_s: number|null}
failure            generation: int, report: object (failure.build_report's report, or the
                   generation's summary {outcome, message, root_rank}), outcome?: str,
                   message?: str, root_rank?: int|null
restart            generation: int (the new one), reason: str
run_end            outcome: str, exit_code: int, wall_s: number, restarts: int,
                   final_step: int, summary: object
=================  =========================================================================

Readers ignore fields they do not know; a new field is added without a version change, a
changed or removed one bumps `SCHEMA_VERSION`. The file is opened for appending: a run
directory used twice holds two runs, each beginning at its ``run_start`` (a torn line left
by a killed writer is ended first, so it never swallows the next event). ``docs/events.md``
has the full description with examples.

Usage::

    log = EventLog(run_dir / "events.jsonl")
    try:
        log.emit("run_start", run_id=..., config=..., ...)
        while not stop.wait(0.25):
            log.observe(registry.snapshot())
        log.observe(registry.snapshot())     # the final state: one last progress sample
        log.emit("run_end", outcome="succeeded", ...)
    finally:
        log.close()

    for event in read_events(run_dir / "events.jsonl"):
        validate_event(event)
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ddp_launch.registry import RankState, RankView, RunSnapshot

SCHEMA_VERSION = 1
EVENT_KINDS = (
    "run_start",
    "register",
    "barrier_open",
    "state",
    "straggler",
    "straggler_cleared",
    "progress",
    "failure",
    "restart",
    "run_end",
)
# Worlds larger than this get one aggregate per progress sample instead of a list of ranks.
PER_RANK_LIMIT = 64
# Ranks named (with their full sample) in an aggregate progress event.
SLOWEST_LIMIT = 8
# The states a "state" event records; the others are covered by register and barrier_open.
RECORDED_STATES = (RankState.HUNG, RankState.FAILED, RankState.DONE)

_RESERVED = ("v", "t", "event")
_log = logging.getLogger(__name__)


# -- writing ---------------------------------------------------------------------------------


class EventLog:
    """Writes ``events.jsonl``; see the module docstring for the schema.

    `emit` and `observe` may be called from any thread. A write that fails (a full disk) is
    logged once and otherwise ignored: the event log never stops a run. After `close`,
    `emit` and `observe` do nothing.

    Args:
        path: the file; its directory is created if needed, an existing file is appended to.
        clock: unix time in seconds, for ``t`` and the progress interval (a seam for tests).
        progress_interval_s: least time between two progress samples.
        per_rank_limit: largest world whose progress samples list every rank.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        progress_interval_s: float = 5.0,
        per_rank_limit: int = PER_RANK_LIMIT,
    ) -> None:
        if progress_interval_s <= 0:
            raise ValueError(f"progress_interval_s must be > 0, got {progress_interval_s}")
        self.path = Path(path)
        self.progress_interval_s = progress_interval_s
        self.per_rank_limit = per_rank_limit
        self._clock = clock
        self._lock = threading.Lock()
        self._write_failed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = _ends_without_newline(self.path)
        self._file: Any = open(self.path, "a", buffering=1, encoding="utf-8")
        if torn:
            self._write("\n")
        # observe()'s memory of the previous snapshot, for the current generation only.
        self._generation: int | None = None
        self._states: dict[int, RankState] = {}
        self._stragglers: set[int] = set()
        self._barrier_seen = False
        self._last_progress_at: float | None = None
        self._force_progress = False

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._file is None

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event now: ``{"v": 1, "t": <now>, "event": event, **fields}``.

        Values are made JSON-safe on the way: enums become their value, paths and unknown
        objects their ``str``, dataclasses dicts, NaN and infinities null.

        Args:
            event: the kind, one of `EVENT_KINDS`.
            **fields: the kind's fields (see the module docstring).

        Raises:
            ValueError: an unknown kind, or a field named ``v``, ``t`` or ``event``.
        """
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {event!r}; known: {', '.join(EVENT_KINDS)}")
        clash = [k for k in _RESERVED if k in fields]
        if clash:
            raise ValueError(f"event fields may not be named {clash}")
        with self._lock:
            self._emit_locked(event, fields)

    def observe(self, snap: RunSnapshot) -> None:
        """Derive events from the registry's latest snapshot (call it a few times a second).

        Writes, compared with the previous snapshot of the same generation: ``register``
        when a rank leaves STARTING, ``barrier_open`` once per generation, ``state`` when a
        rank becomes hung, failed or done, ``straggler`` / ``straggler_cleared`` when a
        rank's straggler flag changes, and a ``progress`` sample every
        ``progress_interval_s`` (and on the first call after a rank ended, so the final
        steps are recorded). A new generation starts with a clean slate; a snapshot of an
        older generation than one already observed is ignored.

        Observe the registry once more when a generation ends, before the next one begins:
        that is where the failed ranks' ``state`` events come from when the supervisor stops
        the group before its next tick.

        Args:
            snap: the registry's snapshot.
        """
        with self._lock:
            if self._file is None:
                return
            if self._generation is not None and snap.generation < self._generation:
                return  # a stale snapshot (taken before a restart): its news is old
            if snap.generation != self._generation:
                self._generation = snap.generation
                self._states = {}
                self._stragglers = set()
                self._barrier_seen = False
            ranks = snap.ranks
            ended = False
            for r in ranks:  # registrations first, so they precede the barrier they opened
                before = self._states.get(r.rank, RankState.STARTING)
                if before is RankState.STARTING and r.state is not RankState.STARTING and r.pid > 0:
                    self._emit_locked(
                        "register",
                        {
                            "rank": r.rank,
                            "node_rank": r.node_rank,
                            "local_rank": r.local_rank,
                            "pid": r.pid,
                            "hostname": r.hostname,
                            "generation": snap.generation,
                        },
                    )
            if snap.barrier_open and not self._barrier_seen:
                self._barrier_seen = True
                self._emit_locked("barrier_open", {"generation": snap.generation, "world_size": snap.world_size})
            median = None
            for r in ranks:
                before = self._states.get(r.rank, RankState.STARTING)
                self._states[r.rank] = r.state
                if r.state is not before and r.state in RECORDED_STATES:
                    ended = True
                    self._emit_locked(
                        "state",
                        {
                            "rank": r.rank,
                            "generation": snap.generation,
                            "state": r.state.value,
                            "previous": before.value,
                            "step": r.step,
                            "exit_code": r.exit_code,
                        },
                    )
                flagged = bool(getattr(r, "straggler", False))
                if flagged and r.rank not in self._stragglers:
                    self._stragglers.add(r.rank)
                    if median is None:
                        median = _median_rate(ranks)
                    self._emit_locked(
                        "straggler",
                        {
                            "rank": r.rank,
                            "generation": snap.generation,
                            "steps_per_s": _round(r.steps_per_s, 3),
                            "median_steps_per_s": _round(median, 3),
                            "step": r.step,
                        },
                    )
                elif not flagged and r.rank in self._stragglers:
                    self._stragglers.discard(r.rank)
                    self._emit_locked(
                        "straggler_cleared",
                        {"rank": r.rank, "generation": snap.generation, "steps_per_s": _round(r.steps_per_s, 3)},
                    )
            self._force_progress = self._force_progress or ended
            self._maybe_progress(snap)

    def close(self) -> None:
        """Flush and close the file. Idempotent."""
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.close()
            except OSError as e:
                self._warn_once(e)
            self._file = None

    # -- internals (the lock is held) -----------------------------------------------------------

    def _emit_locked(self, event: str, fields: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        record = {"v": SCHEMA_VERSION, "t": round(self._clock(), 3), "event": event}
        record.update(fields)
        line = json.dumps(_jsonable(record), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        self._write(line + "\n")

    def _write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()  # line buffering flushes on "\n"; this also covers a partial write
        except (OSError, ValueError) as e:
            self._warn_once(e)

    def _warn_once(self, e: BaseException) -> None:
        if not self._write_failed:
            self._write_failed = True
            _log.warning("cannot write the event log %s: %s (further errors are not reported)", self.path, e)

    def _maybe_progress(self, snap: RunSnapshot) -> None:
        live = [r for r in snap.ranks if r.state is not RankState.STARTING]
        if not live:
            return
        now = self._clock()
        last = self._last_progress_at
        # A clock that went backwards (the wall clock was set) restarts the interval.
        due = last is None or now - last >= self.progress_interval_s or now < last
        if not (due or self._force_progress):
            return
        self._last_progress_at = now
        self._force_progress = False
        fields: dict[str, Any] = {
            "generation": snap.generation,
            "elapsed_s": _round(snap.elapsed_s, 3),
            "world_size": snap.world_size,
        }
        if len(snap.ranks) <= self.per_rank_limit:
            fields["ranks"] = [_sample(r) for r in live]
        else:
            fields["aggregate"] = _aggregate(live)
            slowest = sorted(live, key=lambda r: (r.steps_per_s, r.step, r.rank))[:SLOWEST_LIMIT]
            fields["slowest"] = [_sample(r) for r in slowest]
        self._emit_locked("progress", fields)


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def _round(x: float | None, digits: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _significant(x: float | None) -> float | None:
    """Six significant digits: a loss of 2.3e-05 keeps its precision, 2.302585093 loses noise."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def _sample(r: RankView) -> dict[str, Any]:
    return {
        "rank": r.rank,
        "step": r.step,
        "steps_per_s": _round(r.steps_per_s, 3) or 0.0,
        "loss": _significant(r.loss),
        "samples": r.samples,
        "rss_bytes": r.rss_bytes,
        "cpu_percent": _round(r.cpu_percent, 1) or 0.0,
        "heartbeat_age_s": _round(r.heartbeat_age_s, 2),
    }


def _spread(values: Sequence[float], fmt: Callable[[float], Any]) -> dict[str, Any]:
    return {"min": fmt(min(values)), "median": fmt(statistics.median(values)), "max": fmt(max(values))}


def _aggregate(ranks: Sequence[RankView]) -> dict[str, Any]:
    losses = [r.loss for r in ranks if r.loss is not None]
    ages = [r.heartbeat_age_s for r in ranks if r.heartbeat_age_s is not None]
    return {
        "ranks": len(ranks),
        "step": _spread([r.step for r in ranks], lambda x: int(round(x))),
        "steps_per_s": _spread([r.steps_per_s for r in ranks], lambda x: _round(x, 3) or 0.0),
        "loss": _spread(losses, _significant) if losses else None,
        "rss_bytes_max": max(r.rss_bytes for r in ranks),
        "heartbeat_age_s_max": _round(max(ages), 2) if ages else None,
    }


def _median_rate(ranks: Sequence[RankView]) -> float | None:
    rates = [r.steps_per_s for r in ranks if r.steps_per_s > 0]
    return statistics.median(rates) if rates else None


def _jsonable(value: Any) -> Any:
    """A copy of `value` that json.dumps(allow_nan=False) accepts."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)


# -- reading and checking ----------------------------------------------------------------------


def read_events(path: Path) -> list[dict]:
    """Every event in ``events.jsonl``, in file order.

    Made for reading while the run still writes: a torn line (a writer killed mid-line, or
    the line being written right now) and any other line that is not a JSON object are
    skipped, not fatal. Events are not validated; see `validate_event`.

    Args:
        path: the file.

    Returns:
        The events as dicts.

    Raises:
        FileNotFoundError: there is no such file.
    """
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                _log.debug("%s:%d is not JSON (a torn line?); skipped", path, number)
                continue
            if isinstance(obj, dict):
                events.append(obj)
    return events


_NUMBER = (int, float)
_SAMPLE = {
    "rank": int,
    "step": int,
    "steps_per_s": _NUMBER,
    "loss": (*_NUMBER, type(None)),
    "samples": int,
    "rss_bytes": int,
    "cpu_percent": _NUMBER,
    "heartbeat_age_s": (*_NUMBER, type(None)),
}
# kind -> ({required field: types}, {optional field: types})
_SCHEMA: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "run_start": (
        {
            "run_id": str,
            "config": dict,
            "world_size": int,
            "nnodes": int,
            "nproc_per_node": int,
            "versions": dict,
            "host": str,
        },
        {},
    ),
    "register": (
        {"rank": int, "node_rank": int, "pid": int, "hostname": str, "generation": int},
        {"local_rank": int},
    ),
    "barrier_open": ({"generation": int, "world_size": int}, {}),
    "state": (
        {"rank": int, "generation": int, "state": str, "previous": str},
        {"step": int, "exit_code": (int, type(None))},
    ),
    "straggler": (
        {"rank": int, "generation": int, "steps_per_s": _NUMBER, "median_steps_per_s": (*_NUMBER, type(None))},
        {"step": int},
    ),
    "straggler_cleared": ({"rank": int, "generation": int}, {"steps_per_s": (*_NUMBER, type(None))}),
    "progress": (
        {"generation": int, "elapsed_s": _NUMBER},
        {"world_size": int, "ranks": list, "aggregate": dict, "slowest": list},
    ),
    "failure": (
        {"generation": int, "report": dict},
        {"outcome": str, "message": str, "root_rank": (int, type(None))},
    ),
    "restart": ({"generation": int, "reason": str}, {}),
    "run_end": (
        {
            "outcome": str,
            "exit_code": int,
            "wall_s": _NUMBER,
            "restarts": int,
            "final_step": int,
            "summary": dict,
        },
        {},
    ),
}
_STATE_VALUES = frozenset(s.value for s in RankState)


def _check(obj: Mapping[str, Any], key: str, types: Any, where: str, *, required: bool = True) -> None:
    if key not in obj:
        if required:
            raise ValueError(f"{where}: missing field {key!r}")
        return
    value = obj[key]
    # bool is an int to isinstance, never to this schema.
    if isinstance(value, bool) or not isinstance(value, types):
        names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
        raise ValueError(f"{where}: field {key!r} is {type(value).__name__}, expected {' or '.join(names)}")


def validate_event(obj: dict) -> None:
    """Check one event against the schema (required fields and their types, per kind).

    Unknown extra fields are allowed: readers ignore them.

    Args:
        obj: one parsed line.

    Raises:
        ValueError: it does not match; the message says which field and why.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"an event is a JSON object, not {type(obj).__name__}")
    if obj.get("v") != SCHEMA_VERSION or isinstance(obj.get("v"), bool):
        raise ValueError(f"unsupported schema version {obj.get('v')!r} (expected {SCHEMA_VERSION})")
    _check(obj, "t", _NUMBER, "event")
    kind = obj.get("event")
    if kind not in _SCHEMA:
        raise ValueError(f"unknown event kind {kind!r}")
    where = f"{kind} event"
    required, optional = _SCHEMA[kind]
    for key, types in required.items():
        _check(obj, key, types, where)
    for key, types in optional.items():
        _check(obj, key, types, where, required=False)

    if kind == "state":
        for key in ("state", "previous"):
            if obj[key] not in _STATE_VALUES:
                raise ValueError(f"{where}: {key} {obj[key]!r} is not a rank state")
    elif kind == "progress":
        if ("ranks" in obj) == ("aggregate" in obj):
            raise ValueError(f"{where}: needs exactly one of 'ranks' and 'aggregate'")
        samples = obj["ranks"] if "ranks" in obj else obj.get("slowest", [])
        if "aggregate" in obj:
            _check_aggregate(obj["aggregate"], where)
            _check(obj, "slowest", list, where)
        for i, sample in enumerate(samples):
            if not isinstance(sample, dict):
                raise ValueError(f"{where}: sample {i} is not an object")
            for key, types in _SAMPLE.items():
                _check(sample, key, types, f"{where}, sample {i}")


def _check_aggregate(agg: Mapping[str, Any], where: str) -> None:
    where = f"{where}, aggregate"
    _check(agg, "ranks", int, where)
    for key, nullable in (("step", False), ("steps_per_s", False), ("loss", True)):
        if nullable and key in agg and agg[key] is None:
            continue
        _check(agg, key, dict, where)
        for part in ("min", "median", "max"):
            _check(agg[key], part, _NUMBER, f"{where}.{key}")
    _check(agg, "rss_bytes_max", int, where, required=False)
    _check(agg, "heartbeat_age_s_max", (*_NUMBER, type(None)), where, required=False)
