"""The run's event log, ``<run-dir>/events.jsonl``: what happened during a run, one JSON object
per line, written and flushed as it happens, readable with nothing but ``json``.

The launcher writes the run-level events itself with `EventLog.emit`; `EventLog.observe`
writes the per-rank events from the registry's transitions (`Registry.drain_transitions`, a
few times a second), each dated when it happened, and samples progress from its snapshot;
lines are written in the order things happened. The file grows with time and with events,
never with the heartbeat rate times the number of ranks: progress is sampled once every
``progress_interval_s`` (plus one sample after ranks end), and a world larger than
``per_rank_limit`` ranks (64) gets one aggregate per sample instead of one entry per rank.

Every line has ``v`` (the schema version, `SCHEMA_VERSION`), ``t`` (unix time, seconds,
3 decimals: when it happened, not when it was written) and ``event`` (one of
`EVENT_KINDS`), then the fields of its kind. The fields of every kind are defined once, in
``events.schema.json`` beside this module (`schema()`); ``docs/events.md`` explains them.
A rank's fields have the names of `record.rank_json`, as in ``status --json`` and
``failure.json``.

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
            log.observe(registry.snapshot(), registry.drain_transitions())
        # the final state: what happened since the last tick, one last progress sample
        log.observe(registry.snapshot(), registry.drain_transitions())
        log.emit("run_end", outcome="succeeded", ...)
    finally:
        log.close()

    for event in read_events(run_dir / "events.jsonl"):
        validate_event(event)                # with jsonschema installed
"""

from __future__ import annotations

import dataclasses
import enum
import functools
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

from ddp_launch.record import SAMPLE_FIELDS, RankRecord, RankState, rank_json, rounded, significant
from ddp_launch.registry import RunSnapshot, Transition

SCHEMA_VERSION = 2
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
    "resize",
    "run_end",
)
# Worlds larger than this get one aggregate per progress sample instead of a list of ranks.
PER_RANK_LIMIT = 64
# Ranks named (with their full sample) in an aggregate progress event.
SLOWEST_LIMIT = 8

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
        # The newest generation observed: an older snapshot (taken before a restart) gets no
        # progress sample.
        self._generation: int | None = None
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
        """Write one event now: ``{"v": 2, "t": <now>, "event": event, **fields}``.

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

    def observe(self, snap: RunSnapshot, transitions: Sequence[Transition] = ()) -> None:
        """Write what happened (the registry's transitions) and, when due, a progress sample.

        Each transition becomes one event dated when it happened (the registry's clock at
        the transition, turned into unix time through the snapshot's own time): ``register``,
        ``barrier_open``, ``state`` (a rank entered a final state: done, failed, hung,
        stopped, interrupted), ``straggler`` and ``straggler_cleared``. A ``progress`` sample
        is written every ``progress_interval_s``, and once more after a rank ended, so the
        final steps are recorded. Events are written in the order they happened.

        Drain the registry once more when a generation ends, before the next one begins:
        that is where the stopped ranks' ``state`` events come from.

        Args:
            snap: the registry's snapshot, taken just before `transitions` were drained.
            transitions: `Registry.drain_transitions()`.
        """
        with self._lock:
            if self._file is None:
                return
            # The registry's clock -> unix time, through the moment of the snapshot.
            offset = self._clock() - snap.taken_at
            lines: list[tuple[float, str, dict[str, Any]]] = []
            for tr in transitions:
                fields = _transition_fields(tr)
                if fields is not None:
                    lines.append((tr.at + offset, tr.kind, fields))
                    if tr.kind == "state":
                        self._force_progress = True
            if self._generation is None or snap.generation >= self._generation:
                self._generation = snap.generation
                progress = self._progress_fields(snap)
                if progress is not None:
                    lines.append((snap.taken_at + offset, "progress", progress))
            for t, kind, fields in sorted(lines, key=lambda line: line[0]):
                self._emit_locked(kind, fields, t=t)

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

    def _emit_locked(self, event: str, fields: Mapping[str, Any], t: float | None = None) -> None:
        if self._file is None:
            return
        record = {"v": SCHEMA_VERSION, "t": round(self._clock() if t is None else t, 3), "event": event}
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

    def _progress_fields(self, snap: RunSnapshot) -> dict[str, Any] | None:
        """A progress sample's fields when one is due, else None."""
        live = [r for r in snap.ranks if r.state is not RankState.STARTING]
        if not live:
            return None
        now = self._clock()
        last = self._last_progress_at
        # A clock that went backwards (the wall clock was set) restarts the interval.
        due = last is None or now - last >= self.progress_interval_s or now < last
        if not (due or self._force_progress):
            return None
        self._last_progress_at = now
        self._force_progress = False
        fields: dict[str, Any] = {
            "generation": snap.generation,
            "elapsed_s": rounded(snap.elapsed_s, 3),
            "world_size": snap.world_size,
        }
        if len(snap.ranks) <= self.per_rank_limit:
            fields["ranks"] = [rank_json(r, SAMPLE_FIELDS) for r in live]
        else:
            fields["aggregate"] = _aggregate(live)
            slowest = sorted(live, key=lambda r: (r.steps_per_s, r.step, r.rank))[:SLOWEST_LIMIT]
            fields["slowest"] = [rank_json(r, SAMPLE_FIELDS) for r in slowest]
        return fields


# A transition's event: which of the rank's fields it carries (rank_json's names).
_REGISTER_FIELDS = ("rank", "node_rank", "local_rank", "pid", "hostname", "generation")
_STATE_FIELDS = ("rank", "generation", "state", "step", "optimizer_steps", "reported_step", "exit_code", "exit")


def _transition_fields(tr: Transition) -> dict[str, Any] | None:
    r = tr.record
    if tr.kind == "barrier_open":
        return {"generation": tr.generation, **tr.fields}
    if r is None:
        return None
    if tr.kind == "register":
        return rank_json(r, _REGISTER_FIELDS)
    if tr.kind == "state":
        if not r.state.final:
            return None
        fields = rank_json(r, _STATE_FIELDS)
        fields["previous"] = tr.fields.get("previous", "")
        return fields
    if tr.kind == "straggler":
        fields = rank_json(r, ("rank", "generation", "steps_per_s", "step"))
        fields["median_steps_per_s"] = rounded(tr.fields.get("median_steps_per_s"), 3)
        return fields
    if tr.kind == "straggler_cleared":
        return rank_json(r, ("rank", "generation", "steps_per_s"))
    return None


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


def _spread(values: Sequence[float], fmt: Callable[[float], Any]) -> dict[str, Any]:
    return {"min": fmt(min(values)), "median": fmt(statistics.median(values)), "max": fmt(max(values))}


def _aggregate(ranks: Sequence[RankRecord]) -> dict[str, Any]:
    losses = [r.loss for r in ranks if r.loss is not None]
    ages = [r.heartbeat_age_s for r in ranks if r.heartbeat_age_s is not None]
    return {
        "ranks": len(ranks),
        "step": _spread([r.step for r in ranks], lambda x: int(round(x))),
        "steps_per_s": _spread([r.steps_per_s for r in ranks], lambda x: rounded(x, 3) or 0.0),
        "loss": _spread(losses, significant) if losses else None,
        "rss_bytes_max": max(r.rss_bytes for r in ranks),
        "heartbeat_age_s_max": rounded(max(ages), 2) if ages else None,
    }


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


SCHEMA_FILE = Path(__file__).with_name("events.schema.json")


@functools.cache
def schema() -> dict[str, Any]:
    """The event schema (JSON Schema, draft 2020-12): the one definition of every kind's fields."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def validate_event(obj: dict) -> None:
    """Check one event against `schema()`. Needs the jsonschema package.

    Unknown extra fields are allowed: readers ignore them.

    Args:
        obj: one parsed line.

    Raises:
        ValueError: it does not match; the message says which field and why.
        ImportError: jsonschema is not installed.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "event"
        raise ValueError(f"{obj.get('event', '?') if isinstance(obj, dict) else '?'} event, {where}: {error.message}")
