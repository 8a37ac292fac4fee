"""The report's data: a run's ``events.jsonl`` (and ``failure.json``) read into one plain,
JSON-able dict: per-rank and aggregate series (thinned), markers and summary rows."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ddp_launch import rundir
from ddp_launch.errors import ConfigError
from ddp_launch.observe.events import SLOWEST_LIMIT, read_events
from ddp_launch.observe.format import format_rate

EVENTS_FILE = rundir.EVENTS
# Version of the report-data JSON object (not of the event schema).
DATA_VERSION = 1
# A series longer than this is thinned evenly (first and last points kept): a week-long
# run sampled every 5 s would otherwise make a page of hundreds of megabytes.
MAX_POINTS = 2000
# A large world's chart draws a rank of its own when it ran below SLOW_FRACTION of the median
# rate in at least PERSISTENT_FRACTION of the samples.
SLOW_FRACTION = 0.9
PERSISTENT_FRACTION = 0.2


def load_report_data(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able data (embedded in the HTML page).

    Times are seconds since the run started (its ``run_start`` event, else the first event).

    Args:
        run_dir: the run directory.

    Returns:
        ``{"version", "run_id", "outcome", "running", "t0", "duration_s", "run_start",
        "run_end", "series": [{"rank", "label", "t", "generation", "step", "steps_per_s",
        "loss", "follows", "points", "thinned"}], "aggregate": {"t", "generation",
        "follows", "step_min", ..., "loss_max"} | None, "plotted_ranks": [int],
        "markers": [{"t", "kind", "generation", "label"}], "ranks": [summary row],
        "failure": dict | None, "event_counts": {kind: count}}``.

    Raises:
        ConfigError: the directory has no events.jsonl.
    """
    run_dir = Path(run_dir)
    path = rundir.events_file(run_dir)
    if not path.is_file():
        raise ConfigError(f"no {EVENTS_FILE} in {str(run_dir)!r}: not a run directory, or the run has not started")
    events = _last_run(read_events(path))
    start = next((e for e in events if e.get("event") == "run_start"), None)
    end = next((e for e in reversed(events) if e.get("event") == "run_end"), None)
    t0 = _num(start.get("t")) if start else (_num(events[0].get("t")) if events else 0.0)
    last_t = max((_num(e.get("t")) for e in events), default=t0)

    series = _Series()
    registered: dict[int, dict[str, Any]] = {}
    states: dict[int, tuple[int, str]] = {}
    failures_by_rank: dict[int, int] = {}
    stragglers_by_rank: dict[int, int] = {}
    markers: list[dict[str, Any]] = []
    generations_failed: set[int] = set()
    rank_end_markers: dict[int, dict[str, Any]] = {}
    interrupted: set[int] = set()
    failure_event: dict[str, Any] | None = None
    restarts = 0
    counts: dict[str, int] = {}
    for e in events:
        kind = str(e.get("event"))
        counts[kind] = counts.get(kind, 0) + 1
        t = round(_num(e.get("t")) - t0, 3)
        gen: int | None = _get(e, "generation", int, None)
        rank: int | None = _get(e, "rank", int, None)
        if kind == "progress":
            series.add(e, t)
        elif kind == "register" and rank is not None:
            registered[rank] = {
                "generation": -1 if gen is None else gen,
                "node_rank": _get(e, "node_rank", int, None),
                "hostname": str(e.get("hostname") or ""),
                "pid": _get(e, "pid", int, None),
            }
        elif kind == "state" and rank is not None:
            state = str(e.get("state"))
            states[rank] = (-1 if gen is None else gen, state)
            # Only a rank's own failure counts: a rank the launcher stopped (after another
            # rank failed, or on the user's signal) is "stopped" or "interrupted".
            if state in ("failed", "hung"):
                failures_by_rank[rank] = failures_by_rank.get(rank, 0) + 1
                if gen is not None and gen not in rank_end_markers:
                    exit_text = f" ({e['exit']})" if e.get("exit") else ""
                    rank_end_markers[gen] = _marker(t, "failure", gen, f"rank {rank} {state}{exit_text}")
            elif state == "interrupted" and gen is not None and gen not in interrupted:
                interrupted.add(gen)
                markers.append(_marker(t, "interrupted", gen, "interrupted: the launcher got a stop signal"))
        elif kind == "straggler" and rank is not None:
            stragglers_by_rank[rank] = stragglers_by_rank.get(rank, 0) + 1
            label = f"rank {rank} is a straggler: {_rate(e.get('steps_per_s'))}"
            if e.get("median_steps_per_s") is not None:
                label += f" (median {_rate(e['median_steps_per_s'])})"
            markers.append(_marker(t, "straggler", gen, label))
        elif kind == "failure":
            failure_event = e
            report = _get(e, "report", dict, {})
            message = str(e.get("message") or report.get("message") or "failure")
            outcome = str(e.get("outcome") or report.get("outcome") or "")
            label = f"{outcome}: {message}" if outcome and outcome not in message else message
            markers.append(_marker(t, "failure", gen, label))
            if gen is not None:
                generations_failed.add(gen)
        elif kind == "restart":
            restarts += 1
            markers.append(_marker(t, "restart", gen, f"restart: generation {gen} ({e.get('reason', '')})"))
    # A rank's failure is marked only where the launcher wrote no failure event for it.
    markers += [m for g, m in rank_end_markers.items() if g not in generations_failed]
    markers.sort(key=lambda m: m["t"])

    failure = _read_failure_json(run_dir, not_before=t0)
    if failure is None and failure_event is not None and isinstance(failure_event.get("report"), dict):
        failure = failure_event["report"]

    per_rank, aggregate = series.per_rank(), series.aggregate()
    # A large world's table: the slowest ranks of the last sample, slowest first.
    table_ranks = series.last_slowest if aggregate else sorted({s["rank"] for s in per_rank} | set(registered))
    rows = _summary_rows(
        per_rank, table_ranks, registered, states, failures_by_rank, stragglers_by_rank, restarts, running=end is None
    )
    outcome = str(end.get("outcome", "ended")) if end is not None else "running"
    return {
        "version": DATA_VERSION,
        "run_id": str(start.get("run_id", "")) if start else "",
        "outcome": outcome,
        "running": end is None,
        "t0": t0,
        "duration_s": round(last_t - t0, 3),
        "restarts": restarts,
        "run_start": _without(start, ("v", "event")) if start else None,
        "run_end": _without(end, ("v", "event")) if end else None,
        "series": per_rank,
        "aggregate": aggregate,
        "plotted_ranks": _plotted_ranks(per_rank, aggregate, series.slow_samples),
        "markers": markers,
        "ranks": rows,
        "failure": failure,
        "event_counts": counts,
    }


def _last_run(events: list[dict]) -> list[dict]:
    starts = [i for i, e in enumerate(events) if e.get("event") == "run_start"]
    return events[starts[-1] :] if starts else events


def _num(x: Any, default: float = 0.0) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else default


def _get(d: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """d[key] when it is a `kind` (never a bool for int), else `default`: files are input."""
    value = d.get(key)
    return value if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool) else default


def _opt_num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _rate(x: Any) -> str:
    value = _opt_num(x)
    return "?" if value is None else format_rate(value)


def _marker(t: float, kind: str, generation: Any, label: str) -> dict[str, Any]:
    return {"t": t, "kind": kind, "generation": generation if isinstance(generation, int) else None, "label": label}


def _without(d: dict, keys: Iterable[str]) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _read_failure_json(run_dir: Path, *, not_before: float) -> dict | None:
    path = rundir.failure_file(run_dir)
    try:
        if path.stat().st_mtime < not_before - 1.0:
            return None  # left by an earlier run in the same directory
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Series:
    """Progress samples gathered into per-rank series (and, for large worlds, the aggregate).

    Each rank's series has a ``follows`` column: True where the sample directly follows
    the rank's previous one (same generation, and the rank was in the previous progress
    event). A chart breaks its line where it is False, so a rank sampled only when it was
    among the slowest is not drawn as if it had been seen in between.
    """

    def __init__(self) -> None:
        self._ranks: dict[int, dict[str, list]] = {}
        self._last_seen: dict[int, tuple[int, int]] = {}  # rank -> (progress index, generation)
        self._agg: dict[str, list] = {"t": [], "generation": []}
        self._index = 0
        self.last_slowest: list[int] = []
        # rank -> samples of a large world in which it ran clearly below the median rate
        self.slow_samples: dict[int, int] = {}

    def add(self, e: dict[str, Any], t: float) -> None:
        gen: int = _get(e, "generation", int, 0)
        self._index += 1
        samples: list | None = _get(e, "ranks", list, None)
        large = samples is None
        if samples is None:
            samples = _get(e, "slowest", list, [])
        # samples as the file has them; one without a proper rank is not plotted
        samples = [x for x in samples if isinstance(x, dict) and _get(x, "rank", int, None) is not None]
        if large:
            agg = _get(e, "aggregate", dict, None)
            median = None
            if agg is not None:
                self._add_aggregate(agg, t, gen)
                median = _opt_num(_get(agg, "steps_per_s", dict, {}).get("median"))
            self.last_slowest = [x["rank"] for x in samples]
            for x in samples:
                rate = _opt_num(x.get("steps_per_s"))
                if median and rate is not None and rate < SLOW_FRACTION * median:
                    self.slow_samples[x["rank"]] = self.slow_samples.get(x["rank"], 0) + 1
        for x in samples:
            rank = x["rank"]
            r = self._ranks.setdefault(
                rank, {"t": [], "generation": [], "follows": [], "step": [], "steps_per_s": [], "loss": []}
            )
            r["t"].append(t)
            r["generation"].append(gen)
            r["follows"].append(self._last_seen.get(rank) == (self._index - 1, gen))
            r["step"].append(_opt_num(x.get("step")))
            r["steps_per_s"].append(_opt_num(x.get("steps_per_s")))
            r["loss"].append(_opt_num(x.get("loss")))
            self._last_seen[rank] = (self._index, gen)

    def _add_aggregate(self, agg: dict[str, Any], t: float, gen: int) -> None:
        follows = bool(self._agg["generation"]) and self._agg["generation"][-1] == gen
        self._agg["t"].append(t)
        self._agg["generation"].append(gen)
        self._agg.setdefault("follows", []).append(follows)
        for key in ("step", "steps_per_s", "loss"):
            spread = _get(agg, key, dict, {})
            for part in ("min", "median", "max"):
                self._agg.setdefault(f"{key}_{part}", []).append(_opt_num(spread.get(part)))

    def per_rank(self) -> list[dict[str, Any]]:
        out = []
        for rank in sorted(self._ranks):
            data = _thin(self._ranks[rank])
            out.append({"rank": rank, "label": f"rank {rank}", **data})
        return out

    def aggregate(self) -> dict[str, Any] | None:
        if not self._agg["t"]:
            return None
        return _thin(self._agg)


def _plotted_ranks(
    series: list[dict[str, Any]], aggregate: dict[str, Any] | None, slow_samples: dict[int, int]
) -> list[int]:
    """Every rank; in a large world, those that ran clearly below the median in at least a
    fifth of the samples (at most SLOWEST_LIMIT, the most often first): the persistently
    slow ones, not the noise of who happened to be slowest once."""
    if aggregate is None:
        return [s["rank"] for s in series]
    enough = PERSISTENT_FRACTION * aggregate["points"]
    persistent = sorted((r for r, n in slow_samples.items() if n >= enough), key=lambda r: (-slow_samples[r], r))
    return persistent[:SLOWEST_LIMIT]


def _thin(columns: dict[str, list]) -> dict[str, Any]:
    n = len(columns["t"])
    if n <= MAX_POINTS:
        return {**columns, "points": n, "thinned": False}
    step = (n - 1) / (MAX_POINTS - 1)
    keep = sorted({round(i * step) for i in range(MAX_POINTS)})
    return {**{k: [v[i] for i in keep] for k, v in columns.items()}, "points": n, "thinned": True}


def _summary_rows(
    series: list[dict[str, Any]],
    ranks: list[int],
    registered: dict[int, dict[str, Any]],
    states: dict[int, tuple[int, str]],
    failures: dict[int, int],
    stragglers: dict[int, int],
    restarts: int,
    *,
    running: bool,
) -> list[dict[str, Any]]:
    rows = []
    sampled = {s["rank"]: s for s in series}
    for rank in ranks:
        s = sampled.get(rank)
        reg = registered.get(rank, {})
        rates = [x for x in (s["steps_per_s"] if s else []) if x is not None and x > 0]
        losses = [x for x in (s["loss"] if s else []) if x is not None]
        steps = [x for x in (s["step"] if s else []) if x is not None]
        state = "-"
        if rank in states and states[rank][0] >= reg.get("generation", -1):
            state = states[rank][1]
        elif reg and running:
            state = "running"
        rows.append(
            {
                "rank": rank,
                "node_rank": reg.get("node_rank"),
                "hostname": reg.get("hostname", ""),
                "pid": reg.get("pid"),
                "state": state,
                "final_step": int(steps[-1]) if steps else None,
                "median_steps_per_s": round(statistics.median(rates), 3) if rates else None,
                "last_loss": losses[-1] if losses else None,
                "restarts": restarts,
                "failures": failures.get(rank, 0),
                "straggler_flags": stragglers.get(rank, 0),
            }
        )
    return rows
