"""`ddp-launch report`: a run's curves and summary, rendered from its ``events.jsonl``.

`render_html` writes one self-contained page: the charts are inline SVG drawn here (one
polyline per rank and generation: loss, step rate and step against time since the run
started), with restarts, failures and straggler flags as vertical markers; then the
per-rank summary table, the run's outcome and config, and the failure report's root cause
(``failure.json``, else the last ``failure`` event). The page loads nothing: no scripts, no
fonts, no images from anywhere, so it opens offline and can be mailed around. The plotted
data is embedded as JSON in ``<script type="application/json" id="report-data">`` for
tools and tests (`load_report_data` returns the same object).

`render_png` draws the same charts with matplotlib, an optional extra imported only there.

(The module is not called ``report``: importing a submodule ``ddp_launch.report`` would
replace the package attribute ``ddp_launch.report``, the in-worker API function.)

Both read whatever the file holds, so they work during a run too (the outcome is then
"running"). When a run directory holds several runs (appended), the last one is shown.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp_launch import rundir
from ddp_launch.errors import ConfigError
from ddp_launch.observe.events import SLOWEST_LIMIT, read_events
from ddp_launch.observe.format import format_duration, format_loss, format_rate

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
# Above this many series a chart gets no legend (the summary table names the ranks).
LEGEND_LIMIT = 16
# tab10: distinguishable, and the same colours matplotlib uses for the PNGs.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
MARKER_COLORS = {"restart": "#1f77b4", "failure": "#d62728", "straggler": "#ff7f0e", "interrupted": "#7f7f7f"}
# (data key, chart title, y-axis label, file stem for the PNG, y axis starts at 0)
CHARTS = (
    ("loss", "Loss", "loss", "report-loss", False),
    # Rates and steps from zero: a rank 10 % slower should look 10 % slower.
    ("steps_per_s", "Step rate", "steps/s", "report-step-rate", True),
    ("step", "Step", "step", "report-step", True),
)


# -- the data ----------------------------------------------------------------------------------


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


def _count_text(x: Any) -> str:
    value = _opt_num(x)
    return "?" if value is None else f"{value:.0f}"


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


# -- SVG charts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    label: str
    color: str
    segments: list[list[tuple[float, float]]]  # broken at generations, gaps and missing values


def _lines_for(data: dict[str, Any], key: str) -> list[_Line]:
    lines = []
    plotted = set(data["plotted_ranks"])
    for i, s in enumerate(s for s in data["series"] if s["rank"] in plotted):
        segments = _segments(s["t"], s[key], s["follows"])
        if segments:
            lines.append(_Line(s["label"], PALETTE[i % len(PALETTE)], segments))
    agg = data.get("aggregate")
    if agg:
        # greys, so that the ranks drawn in colour stand out against the spread
        for part, color in (("max", "#b0b0b0"), ("median", "#404040"), ("min", "#b0b0b0")):
            segments = _segments(agg["t"], agg.get(f"{key}_{part}", []), agg["follows"])
            if segments:
                lines.append(_Line(f"{part} over ranks", color, segments))
    return lines


def _segments(
    ts: Sequence[float], ys: Sequence[float | None], follows: Sequence[bool]
) -> list[list[tuple[float, float]]]:
    segments: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    for t, y, joined in zip(ts, ys, follows):
        if y is None or not joined:
            if current:
                segments.append(current)
            current = []
        if y is not None:
            current.append((t, y))
    if current:
        segments.append(current)
    return segments


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values from at or below `lo` to the first at or above `hi`, 1, 2 or 5 times
    a power of ten apart (about `count` intervals)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    # Counted, not looped until past `hi`: at 1e20, adding a small step changes nothing.
    n = min(math.ceil((hi - first) / step - 1e-9), 4 * max(1, count))
    return [round(first + k * step, 12) for k in range(max(n, 0) + 1)]


def _time_text(seconds: float) -> str:
    return "0" if seconds == 0 else format_duration(seconds)


def _tick_text(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.6g}"


def _svg_chart(
    title: str, y_label: str, lines: list[_Line], markers: list[dict], x_max: float, *, zero_based: bool
) -> str:
    width, height = 880, 280
    left, right, top, bottom = 70, 20, 28, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    ys = [y for line in lines for seg in line.segments for _, y in seg]
    y_lo, y_hi = min(ys), max(ys)
    if y_lo > 0 and (zero_based or y_lo < 0.25 * y_hi):
        y_lo = 0.0  # also when the data spans most of the way there anyway
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - (abs(y_lo) * 0.1 or 1.0), y_hi + (abs(y_hi) * 0.1 or 1.0)
    y_ticks = nice_ticks(y_lo, y_hi)
    y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    x_max = max(x_max, 1e-9)
    x_ticks = [t for t in nice_ticks(0.0, x_max) if t <= x_max]

    def px(t: float) -> float:
        return left + plot_w * t / x_max

    def py(y: float) -> float:
        return top + plot_h * (1 - (y - y_lo) / (y_hi - y_lo))

    esc = html.escape
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{esc(title)}">',
        f'<text class="title" x="{left}" y="18">{esc(title)}</text>',
        f'<rect class="plot" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for y in y_ticks:
        out.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_tick_text(y)}</text>')
    for t in x_ticks:
        out.append(f'<line class="grid" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + plot_h}"/>')
        out.append(
            f'<text class="tick" x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
            f"{esc(_time_text(t))}</text>"
        )
    out.append(
        f'<text class="axis" x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">time since start</text>'
    )
    out.append(
        f'<text class="axis" x="14" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">{esc(y_label)}</text>'
    )
    for i, m in enumerate(markers):
        if not 0 <= m["t"] <= x_max:
            continue
        color = MARKER_COLORS.get(m["kind"], "#555")
        x = px(m["t"])
        out.append(
            f'<g class="marker {esc(m["kind"])}"><title>{esc(format_duration(m["t"]))}: {esc(m["label"])}</title>'
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="{color}"/>'
            # staggered, so the letters of markers close in time stay readable
            f'<text x="{x + 3:.1f}" y="{top + 11 + 11 * (i % 3)}" fill="{color}">{esc(m["kind"][0].upper())}</text></g>'
        )
    for line in lines:
        out.append(f'<g class="series" data-label="{esc(line.label)}" stroke="{line.color}">')
        out.append(f"<title>{esc(line.label)}</title>")
        for seg in line.segments:
            points = " ".join(f"{px(t):.1f},{py(y):.1f}" for t, y in seg)
            if len(seg) == 1:
                (t, y) = seg[0]
                out.append(f'<circle cx="{px(t):.1f}" cy="{py(y):.1f}" r="2" fill="{line.color}"/>')
            else:
                out.append(f'<polyline points="{points}"/>')
        out.append("</g>")
    out.append("</svg>")
    if len(lines) <= LEGEND_LIMIT:
        items = "".join(
            f'<span class="key"><span class="swatch" style="background:{line.color}"></span>{esc(line.label)}</span>'
            for line in lines
        )
        out.append(f'<div class="legend">{items}</div>')
    return "\n".join(out)


# -- HTML --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
       max-width: 960px; color: #222; padding: 0 12px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.outcome { display: inline-block; padding: 2px 8px; border-radius: 4px; color: #fff; font-weight: 600; }
.outcome.succeeded { background: #2ca02c; } .outcome.running { background: #1f77b4; }
.outcome.other { background: #d62728; }
.meta { color: #555; }
table { border-collapse: collapse; font-size: 13px; margin-top: 6px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
svg.chart { max-width: 100%; height: auto; display: block; }
svg .plot { fill: #fff; stroke: #bbb; } svg .grid { stroke: #eee; }
svg .tick, svg .axis { font-size: 11px; fill: #555; } svg .title { font-size: 14px; font-weight: 600; }
svg .series { fill: none; stroke-width: 1.5; } svg .marker line { stroke-dasharray: 4 3; stroke-width: 1.2; }
svg .marker text { font-size: 10px; font-weight: 700; }
.legend { font-size: 12px; margin: 2px 0 12px 70px; } .key { margin-right: 12px; white-space: nowrap; }
.swatch { display: inline-block; width: 12px; height: 3px; margin-right: 4px; vertical-align: middle; }
.empty { color: #777; font-style: italic; }
"""


def render_html(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's HTML report.

    Args:
        run_dir: the run directory (its events.jsonl, and failure.json when present).
        out: where to write; default ``run_dir / "report.html"``.

    Returns:
        The written file.

    Raises:
        ConfigError: the directory has no events.jsonl.
    """
    run_dir = Path(run_dir)
    data = load_report_data(run_dir)
    out = Path(out) if out is not None else rundir.report_file(run_dir)
    page = _page(data, run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a browser reloading the page never sees half of it.
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the report from the run's other readers
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _page(data: dict[str, Any], run_dir: Path) -> str:
    esc = html.escape
    run_id = data["run_id"] or run_dir.name
    start = data["run_start"] or {}
    end = data["run_end"]
    outcome = data["outcome"]
    badge = outcome if outcome in ("succeeded", "running") else "other"
    started = _local_time(data["t0"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ddp-launch report: {esc(run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>ddp-launch run {esc(run_id)}</h1>",
        f'<p><span class="outcome {badge}">{esc(outcome)}</span> <span class="meta">'
        f"started {esc(started)} on {esc(str(start.get('host', '?')))}, "
        f"{esc(str(start.get('world_size', '?')))} ranks "
        f"({esc(str(start.get('nnodes', '?')))} node(s) x {esc(str(start.get('nproc_per_node', '?')))})</span></p>",
    ]
    parts.append(_outcome_table(data, end))
    if data["running"]:
        parts.append(
            f'<p class="meta">The run had not ended when this page was made ({esc(format_duration(data["duration_s"]))}'
            " after its start); run <code>ddp-launch report</code> again to update it.</p>"
        )
    if data["failure"]:
        parts.append(_failure_section(data["failure"], recovered=outcome == "succeeded"))

    parts.append("<h2>Curves</h2>")
    if data["aggregate"]:
        parts.append(
            '<p class="meta">A large world: the curves show the minimum, median and maximum over the ranks, '
            "and the ranks that were persistently among the slowest.</p>"
        )
    x_max = max(data["duration_s"], max((m["t"] for m in data["markers"]), default=0.0))
    for key, title, y_label, _, zero_based in CHARTS:
        lines = _lines_for(data, key)
        if lines:
            parts.append(_svg_chart(title, y_label, lines, data["markers"], x_max, zero_based=zero_based))
        else:
            hint = " (report it with ddp_launch.report(loss=...) in the script)" if key == "loss" else ""
            parts.append(f'<p class="empty">{esc(title)}: no data yet{esc(hint)}.</p>')

    if data["markers"]:
        parts.append("<h2>Timeline</h2><table><tr><th>time</th><th>event</th><th>generation</th><th>what</th></tr>")
        for m in data["markers"]:
            gen = "" if m["generation"] is None else str(m["generation"])
            parts.append(
                f'<tr><td class="num">{esc(format_duration(m["t"]))}</td><td>{esc(m["kind"])}</td>'
                f'<td class="num">{esc(gen)}</td><td>{esc(m["label"])}</td></tr>'
            )
        parts.append("</table>")

    parts.append(_ranks_table(data["ranks"], data["aggregate"]))
    parts.append("<h2>Configuration</h2>")
    parts.append(_kv_table(_get(start, "config", dict, {})))
    if isinstance(start.get("versions"), dict):
        parts.append("<h2>Versions</h2>")
        parts.append(_kv_table(start["versions"]))
    counts = ", ".join(f"{esc(k)} {v}" for k, v in sorted(data["event_counts"].items()))
    parts.append(f'<p class="meta">From {esc(str(rundir.events_file(run_dir)))}: {counts or "no events"}.</p>')
    parts.append(f'<script type="application/json" id="report-data">{_json_for_script(data)}</script>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _local_time(t: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t > 0 else "?"
    except (OverflowError, OSError, ValueError):  # not a time (a damaged file)
        return "?"


def _json_for_script(data: Any) -> str:
    # A NaN from a foreign file would make the block unparseable for JSON.parse: null it.
    data = json.loads(json.dumps(data, default=str), parse_constant=lambda name: None)
    # "<", ">" and "&" as JSON escapes: no text can close the script element early.
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _outcome_table(data: dict[str, Any], end: dict[str, Any] | None) -> str:
    rows: list[tuple[str, str]] = []
    if end:
        rows.append(("wall time", format_duration(_num(end.get("wall_s")))))
        rows.append(("exit code", str(end.get("exit_code", "?"))))
        rows.append(("final step", str(end.get("final_step", "?"))))
        rows.append(("restarts", str(end.get("restarts", data["restarts"]))))
        summary = end.get("summary")
        if isinstance(summary, dict):
            shown = {"wall_s", "exit_code", "final_step", "restarts"}
            rows += [(str(k), _value_text(v)) for k, v in summary.items() if k not in shown]
    else:
        rows.append(("elapsed", format_duration(data["duration_s"])))
        rows.append(("restarts so far", str(data["restarts"])))
    return _rows_table(rows)


def _failure_section(failure: dict[str, Any], *, recovered: bool) -> str:
    esc = html.escape
    parts = ["<h2>Failure (the run recovered from it)</h2>" if recovered else "<h2>Failure</h2>"]
    outcome, message = failure.get("outcome"), failure.get("message")
    if outcome or message:
        parts.append(f"<p><b>{esc(str(outcome or 'failed'))}</b>: {esc(str(message or ''))}</p>")
    cause = failure.get("root_cause")
    if isinstance(cause, dict):
        where = f"rank {cause.get('rank')}"
        if cause.get("hostname"):
            where += f" on {cause['hostname']} (node {cause.get('node_rank')})"
        what = cause.get("exit") or cause.get("hang") or ""
        parts.append(
            f"<p>Root cause: {esc(where)}, pid {esc(str(cause.get('pid')))}, generation "
            f"{esc(str(cause.get('generation')))}, step {esc(str(cause.get('step')))}: {esc(str(what))}</p>"
        )
        if cause.get("exception_type"):
            parts.append(f"<p>Exception: <code>{esc(str(cause['exception_type']))}</code></p>")
        for key, title in (("traceback", "Traceback"), ("stack", "Where it was stuck")):
            if cause.get(key):
                parts.append(f"<p>{title}:</p><pre>{esc(str(cause[key]))}</pre>")
        tail = cause.get("log_tail")
        if tail and not cause.get("traceback") and isinstance(tail, list):
            parts.append(f"<p>Last lines of rank-{esc(str(cause.get('rank')))}.log:</p>")  # rundir.rank_log
            parts.append(f"<pre>{esc(chr(10).join(str(x) for x in tail))}</pre>")
    elif failure.get("root_rank") is not None:
        parts.append(f"<p>Root cause: rank {esc(str(failure['root_rank']))}</p>")
    consequences = failure.get("consequences")
    if isinstance(consequences, list) and consequences:
        items = "".join(
            f"<li>rank {esc(str(c.get('rank')))} then ended too ({esc(str(c.get('exit')))})</li>"
            for c in consequences
            if isinstance(c, dict)
        )
        parts.append(f"<p>As a consequence:</p><ul>{items}</ul>")
    return "\n".join(parts)


def _ranks_table(rows: list[dict[str, Any]], aggregate: dict[str, Any] | None) -> str:
    esc = html.escape
    if not rows:
        return '<h2>Ranks</h2><p class="empty">No rank has registered yet.</p>'
    head = "<h2>Ranks</h2>"
    if aggregate:
        rates = "/".join(_rate(aggregate[f"steps_per_s_{p}"][-1]) for p in ("min", "median", "max"))
        steps = "/".join(_count_text(aggregate[f"step_{p}"][-1]) for p in ("min", "median", "max"))
        head += (
            f'<p class="meta">The slowest ranks at the last sample, slowest first. Over all ranks: step '
            f"min/median/max {esc(steps)}, step rate {esc(rates)}.</p>"
        )
    head += (
        "<table><tr><th>rank</th><th>node</th><th>host</th><th>state</th><th>final step</th>"
        "<th>median steps/s</th><th>last loss</th><th>restarts</th><th>failures</th><th>straggler</th></tr>"
    )
    body = []
    for r in rows:
        cells = [
            str(r["rank"]),
            "-" if r["node_rank"] is None else str(r["node_rank"]),
            r["hostname"] or "-",
            r["state"],
            "-" if r["final_step"] is None else str(r["final_step"]),
            "-" if r["median_steps_per_s"] is None else format_rate(r["median_steps_per_s"]),
            format_loss(r["last_loss"]),
            str(r["restarts"]),
            str(r["failures"]),
            "yes" if r["straggler_flags"] else "",
        ]
        numeric = {0, 1, 4, 5, 6, 7, 8}
        body.append(
            "<tr>"
            + "".join(
                f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>" for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    return head + "".join(body) + "</table>"


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict) and value and all(isinstance(v, (str, int, float, type(None))) for v in value.values()):
        return ", ".join(
            f"{k} {_value_text(v)}" for k, v in value.items()
        )  # {"min": 1.5, "max": 2} -> "min 1.5, max 2"
    return json.dumps(value, ensure_ascii=False, default=str)


def _kv_table(d: dict[str, Any]) -> str:
    if not d:
        return '<p class="empty">Not recorded.</p>'
    return _rows_table([(str(k), _value_text(v)) for k, v in d.items()])


def _rows_table(rows: list[tuple[str, str]]) -> str:
    esc = html.escape
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


# -- PNG ---------------------------------------------------------------------------------------


def render_png(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the report's charts as PNG images (needs matplotlib, an optional extra).

    Args:
        run_dir: the run directory.
        out_dir: where to write; default `run_dir`. Files: ``report-loss.png`` (when a
            loss was reported), ``report-step-rate.png``, ``report-step.png``.

    Returns:
        The written files; empty when there is no progress data yet.

    Raises:
        ConfigError: matplotlib is not installed, or the directory has no events.jsonl.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("PNG plots need matplotlib: pip install 'ddp-launch[report]'") from None
    run_dir = Path(run_dir)
    data = load_report_data(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = data["run_id"] or run_dir.name
    written = []
    for key, title, y_label, stem, zero_based in CHARTS:
        lines = _lines_for(data, key)
        if not lines:
            continue
        # Figure + Agg canvas, not pyplot: no global state, no GUI backend, thread-safe.
        fig = Figure(figsize=(10, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for line in lines:
            for i, seg in enumerate(line.segments):
                ax.plot(
                    [t for t, _ in seg],
                    [y for _, y in seg],
                    color=line.color,
                    linewidth=1.3,
                    marker="." if len(seg) == 1 else None,
                    label=line.label if i == 0 else None,
                )
        for m in data["markers"]:
            ax.axvline(m["t"], color=MARKER_COLORS.get(m["kind"], "#555"), linestyle="--", linewidth=1)
        # "$" would start matplotlib's mathtext in a user's run id.
        ax.set_title(f"{title} - run {run_id} ({data['outcome']})".replace("$", r"\$"))
        if zero_based:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel(y_label)
        ax.grid(True, color="#eee")
        if len(lines) <= LEGEND_LIMIT:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = rundir.png_file(out_dir, stem)
        fig.savefig(path, format="png")
        written.append(path)
    return written
