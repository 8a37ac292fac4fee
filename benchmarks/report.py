"""The suite's results as a terminal table (and the README's markdown table) and as JSON."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.procs import DDP_LAUNCH, TORCHRUN


def machine() -> dict:
    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("torch", "grpcio", "ddp-launch"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    return {
        "cpus": cpus,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": versions["torch"],
        "grpcio": versions["grpcio"],
        "ddp_launch": versions["ddp-launch"],
        "load_average_at_start": list(os.getloadavg()),
        "hostname": platform.node(),
    }


def commit() -> str | None:
    """The checked-out commit, with "+dirty" when the tree has changes (None outside git)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "steps/s" or abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _cell(stats: dict, unit: str) -> str:
    """'median (min-max)' for one launcher, with failures and 'not detected' runs counted."""
    parts = []
    if stats["median"] is not None:
        lo, hi = _num(stats["min"], unit), _num(stats["max"], unit)
        parts.append(f"{_num(stats['median'], unit)} ({lo}-{hi})")
    if stats.get("not_detected"):
        parts.append(f"not detected within {stats['bound_s']:g} s ({stats['not_detected']}/{len(stats['values'])})")
    if stats["failed"]:
        parts.append(f"{stats['failed']} failed")
    return ", ".join(parts) or "-"


def rows(result: dict) -> list[list[str]]:
    """The side-by-side figures: figure, unit, ddp-launch, torchrun, median ratio, target, met."""
    out = []
    for key, fig in result["figures"].items():
        if fig["kind"] != "pairs":
            continue
        ratio = fig["ratio_median"]
        out.append(
            [
                key,
                fig["unit"],
                _cell(fig["launchers"][DDP_LAUNCH], fig["unit"]),
                _cell(fig["launchers"][TORCHRUN], fig["unit"]),
                f"{ratio:.2f}x" if ratio is not None else "-",
                fig["target"],
                {True: "yes", False: "NO", None: "-"}[fig["met"]],
            ]
        )
    return out


def _relayed(d: dict) -> str:
    if not d.get("relayed"):
        return ""
    return f" ({d['nodes']} nodes of {d['workers'] // d['nodes']}, relayed; a relay: {d['relay_cpu_percent']:.0f}% CPU)"


def control_rows(result: dict) -> list[list[str]]:
    """The control plane (ddp-launch only): one row per heartbeat rate."""
    out = []
    for key, fig in result["figures"].items():
        if fig["kind"] != "control_plane":
            continue
        d = fig["ddp_launch"]
        if d is None:
            out.append([key, f"failed: {fig['error']}"] + [""] * (len(CONTROL_HEADER) - 2))
            continue
        # Held the offered rate (10,240/s at 10 Hz with 1,024 workers) within the latency bound.
        held = (
            d["heartbeats_per_s"] >= 0.99 * d["offered_per_s"]
            and d["p99_ms"] is not None
            and d["p99_ms"] <= 50
            and not d["errors"]
        )
        if d["workers"] >= TARGET_WORKERS:
            met = "yes" if held else "NO"
        else:  # e.g. --quick: a smaller world says nothing about the target
            met = f"- (held; {d['workers']} workers, not {TARGET_WORKERS:,})" if held else "- (NOT held)"
        errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "0"
        out.append(
            [
                key,
                f"{d['workers']} x {d['rate_hz']:g} Hz = {d['offered_per_s']:.0f}" + _relayed(d),
                f"{d['heartbeats_per_s']:.0f}",
                f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f}" if d["p99_ms"] is not None else "- (none answered)",
                f"{d['loop_lag_p99_ms']:.1f}" if d.get("loop_lag_p99_ms") is not None else "-",
                f"{d['master_cpu_percent']:.0f}%",
                f"{d['master_rss_mb']:.0f}",
                str(d["master_threads"]),
                f"{d['event_log_kb_per_min']:.0f}" if d.get("event_log_kb_per_min") is not None else "-",
                f"{d['master_cpu_us_per_heartbeat']:.0f}" if d["master_cpu_us_per_heartbeat"] else "-",
                f"{d['one_core_capacity_per_s']:.0f}" if d["one_core_capacity_per_s"] else "-",
                errors,
                met,
            ]
        )
    return out


HEADER = ["figure", "unit", "ddp-launch median (min-max)", "torchrun median (min-max)", "ratio", "target", "met"]
CONTROL_HEADER = [
    "figure",
    "offered/s",
    "achieved/s",
    "p50 / p99 ms",
    "master loop lag p99 ms",
    "master CPU",
    "RSS MB",
    "threads",
    "events kB/min",
    "CPU us/hb",
    "~hb/s per core",
    "errors",
    "met",
]
TARGET_WORKERS = 1024
CONTROL_TARGET = (
    ">= 10,000 heartbeats/s on one core with p99 RPC latency <= 50 ms; met = the offered rate was held "
    "with p99 <= 50 ms and no errors (no torchrun counterpart). p99 is the round trip the simulated workers "
    "see, their own processes' delays included; the master's loop lag is how long a ready callback waited for "
    "the master's event loop"
)


def _plain(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for n, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def terminal_table(result: dict) -> str:
    m = result["machine"]
    quick = " (--quick)" if result["settings"]["quick"] else ""
    out = [
        f"ddp-launch benchmarks, {result['date']}, {m['cpus']} CPUs ({m['cpu_model']}), torch {m['torch']}, "
        f"{result['settings']['pairs']} alternating pairs per figure{quick}",
        "",
    ]
    if rows(result):
        out += _plain([HEADER, *rows(result)])
    if control_rows(result):
        out += ["", f"control plane: {CONTROL_TARGET}", *_plain([CONTROL_HEADER, *control_rows(result)])]
    notes = [f"  {key}: {fig['note']}" for key, fig in result["figures"].items() if fig.get("note")]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def _markdown(table: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + " --- |" * len(table[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in table[1:]]
    return lines


def markdown_tables(result: dict) -> str:
    out = []
    if rows(result):
        out += _markdown([HEADER, *rows(result)])
    if control_rows(result):
        out += ["", f"Control plane: {CONTROL_TARGET}", "", *_markdown([CONTROL_HEADER, *control_rows(result)])]
    return "\n".join(out)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
