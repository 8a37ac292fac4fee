"""The failure report: what went wrong, where, and why, as JSON (run dir) and as text.

The first failure of a generation is the root cause; ranks that died after it (usually a
peer's "connection closed" in a collective) are listed as its consequences.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ddp_launch import rundir
from ddp_launch.record import RankRecord, describe_exit, rank_json
from ddp_launch.run.result import GenerationResult, Outcome, RunResult

LOG_TAIL_LINES = 20
# rank_json's fields in the report: the root cause's, and every rank's as it ended.
_ROOT_FIELDS = (
    "rank",
    "node_rank",
    "local_rank",
    "hostname",
    "pid",
    "state",
    "step",
    "optimizer_steps",
    "reported_step",
)
_RANK_FIELDS = (
    "rank",
    "node_rank",
    "hostname",
    "pid",
    "state",
    "step",
    "optimizer_steps",
    "reported_step",
    "heartbeat_age_s",
    "exit_code",
    "exit",
)


def build_report(result: RunResult, tails: dict[int, list[str]]) -> dict[str, Any]:
    """The report of a run that did not succeed, as plain JSON-able data.

    Args:
        result: the supervisor's result.
        tails: the last lines of each rank's log.
    """
    last = result.last
    ranks = {r.rank: r for r in (last.snapshot.ranks if last.snapshot else ())}
    return {
        "outcome": result.outcome.value,
        "message": last.message,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(result.wall_s, 3),
        "restarts": result.restarts,
        "flapping": flapping(result),
        "root_cause": _root_cause(last, ranks, tails),
        "consequences": [
            {"rank": f.rank, "pid": f.pid, "exit": f.description, "exit_code": f.exit_code}
            for f in last.failures
            if f.rank != last.root_rank
        ],
        # Every rank of the last generation as it ended (read after its last heartbeat).
        "ranks": [rank_json(r, _RANK_FIELDS) for r in ranks.values()],
        "generations": [
            {"generation": g.generation, "outcome": g.outcome.value, "message": g.message, "root_rank": g.root_rank}
            for g in result.generations
        ],
    }


def _root_cause(g: GenerationResult, ranks: dict[int, RankRecord], tails: dict[int, list[str]]) -> dict | None:
    if g.root_rank is None:
        return None
    record = ranks.get(g.root_rank)
    failure = next((f for f in g.failures if f.rank == g.root_rank), None)
    cause: dict[str, Any] = rank_json(record, _ROOT_FIELDS) if record else {"rank": g.root_rank}
    cause["generation"] = g.generation
    if failure:
        cause["pid"] = failure.pid
    cause["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(failure.at)) if failure else None
    if failure:
        cause["exit_code"] = failure.exit_code
        cause["exit"] = describe_exit(failure.exit_code)
        if failure.exit_code < 0:
            cause["signal"] = cause["exit"].removeprefix("signal ")
    if g.outcome is Outcome.HUNG:
        cause["hang"] = next((v.reason for v in g.hung if v.rank == g.root_rank), g.message)
        cause["stack"] = g.stacks.get(g.root_rank, "")
    if record and record.traceback:
        cause["exception_type"] = record.exception_type
        cause["traceback"] = record.traceback
    cause["log_tail"] = tails.get(g.root_rank, [])[-LOG_TAIL_LINES:]
    return cause


def flapping(result: RunResult) -> bool:
    """True when the last restarts made no progress: each of the last three generations died
    at or before the step the one before it reached."""
    steps = [g.snapshot.step for g in result.generations if g.snapshot and g.outcome is not Outcome.SUCCEEDED]
    last = steps[-3:]
    return len(last) == 3 and all(b <= a for a, b in zip(last, last[1:]))


def format_report(report: dict[str, Any], run_dir: Path) -> str:
    """The report as the user reads it at the end of a failed run."""
    lines = [f"ddp-launch: run {report['outcome']}: {report['message']}"]
    if report["restarts"]:
        lines.append(f"  after {report['restarts']} restart(s)")
    if report["flapping"]:
        lines.append("  restarts made no progress: every generation failed at or before the previous one's step")
    cause = report["root_cause"]
    if cause:
        where = f"rank {cause['rank']}"
        if cause.get("hostname"):
            where += f" on {cause['hostname']} (node {cause['node_rank']})"
        what = cause.get("exit") or cause.get("hang") or ""
        lines.append(f"  root cause: {where}, pid {cause['pid']}, generation {cause['generation']}: {what}")
        if cause.get("traceback"):
            lines.append("  traceback (from the worker):")
            lines += ["    " + t for t in cause["traceback"].rstrip().splitlines()]
        if cause.get("stack"):
            lines.append("  where it was stuck (Python stacks, all threads):")
            lines += ["    " + t for t in cause["stack"].rstrip().splitlines()]
        if cause.get("log_tail") and not cause.get("traceback"):
            lines.append(f"  last lines of {rundir.rank_log(run_dir, cause['rank']).name}:")
            lines += ["    " + t for t in cause["log_tail"]]
    for c in report["consequences"]:
        lines.append(f"  rank {c['rank']} then ended too ({c['exit']}), as a consequence")
    if report["outcome"] in (Outcome.TIMED_OUT.value, Outcome.HUNG.value, Outcome.INTERRUPTED.value):
        for r in report["ranks"]:
            age = r["heartbeat_age_s"]
            age_text = "no heartbeat" if age is None else f"last heartbeat {age:.1f} s ago"
            step = f"step {r['step']}" if r["reported_step"] is not None else f"optimizer step {r['step']}"
            lines.append(f"  rank {r['rank']}: {r['state']}, {step}, {age_text}")
    lines.append(f"  report: {rundir.failure_file(run_dir)}; logs: {run_dir}/{rundir.RANK_LOG_PATTERN}")
    return "\n".join(lines)
