"""The report page: `render_html` writes one self-contained HTML file (outcome, failure,
the SVG charts, timeline and tables, the data embedded as JSON), every text escaped."""

from __future__ import annotations

import html
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ddp_launch import rundir
from ddp_launch.observe.format import format_duration, format_loss, format_rate
from ddp_launch.observe.report.data import _get, _num, _opt_num, _rate, load_report_data
from ddp_launch.observe.report.svg import CHARTS, _lines_for, _svg_chart

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


def _count_text(x: Any) -> str:
    value = _opt_num(x)
    return "?" if value is None else f"{value:.0f}"
