"""The report's charts as inline SVG: pure functions from the report data to SVG text
(nothing loaded from anywhere), and the chart list and colours the PNGs share."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ddp_launch.observe.format import format_duration

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
