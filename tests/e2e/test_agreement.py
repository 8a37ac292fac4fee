"""Every place a run's figures reach the user agrees with every other: the live view and the
end-of-run summary (stderr), ``status --json``, ``events.jsonl``, ``failure.json`` and the
report's data, for a run with a kill-and-restart and for a Ctrl-C'd run.

The workload (scripts/agreement_train.py) sleeps 0.05 s a step, so it cannot train faster than
20 steps/s: a rate far above the one measured before a kill is a resume spike, not training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from ddp_launch.observe.events import read_events, validate_event
from ddp_launch.observe.format import format_duration, format_loss, rate_number
from ddp_launch.observe.report import load_report_data
from ddp_launch.record import SAMPLE_FIELDS
from tests.e2e.launch import SCRIPTS, kill_tree, launcher_command, launcher_env, poll_status

pytestmark = [pytest.mark.e2e]

TRAIN = str(SCRIPTS / "agreement_train.py")
PAUSE_S = "0.05"
BATCH = 8  # agreement_train.py's per-rank batch
WORLD = 2

# The end-of-run summary's lines (view.format_summary), as a user reads them.
HEADER = re.compile(r"^\[ddp-launch\] run \S+: (\d+) ranks, (.+)$")
STEP_LINE = re.compile(
    r"^  step       (\d+)/(\d+) \(the script's step\); (\d+)(?:-(\d+) \(by rank\))? optimizer steps"
    r"(?: in generation (\d+))?(?:, (\d+) in all (\d+) generations)?(?: \(([\d.]+) it/s overall\))?$"
)
WALL_LINE = re.compile(r"^  wall time  (\S+)$")
SAMPLES_LINE = re.compile(r"^  samples    (\d+) \(as the script reported them\)$")
SAMPLES_RATE_LINE = re.compile(r"^  samples/s  ([\d.]+) \((\d+) samples\)$")
RESTARTS_LINE = re.compile(r"^  restarts   (\d+)$")
RATE_LINE = re.compile(
    r"^  step rate  min/median/max ([\d.]+)/([\d.]+)/([\d.]+) it/s \(recent\), slowest rank (\d+) \(([\d.]+) it/s\)$"
)
LOSS_LINE = re.compile(r"^  loss       (\S+) \(each rank's last report\(loss=\.\.\.\), mean over (\d+) ranks\)$")
# The live view's plain line (view.format_plain_line) and the restart line (format_restart_line).
PLAIN_LINE = re.compile(
    r"^\[ddp-launch\] step (\d+)/(\d+) \(\d+%\) \| (\S+ (?:it/s|s/it))(?: \| eta \S+)?(?: \| loss (\S+))?"
    r" \| (.+?) \| (gen \d+(?: \(restart \d+/\d+\))?)(?: \| stragglers: .+)?$"
)
RESTART_LINE = re.compile(
    r"^\[ddp-launch\] rank (\d+) died \(([^)]*)\) at step (\d+); restarting as generation (\d+) \(restart (\d+)/(\d+)\)$"
)
# failure.json's text form: where each rank was when an interrupted run stopped.
REPORT_RANK_LINE = re.compile(r"^  rank (\d+): (\w+), step (\d+), ")


# -- helpers ---------------------------------------------------------------------------------


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    """The launcher in a session (and process group) of its own, its output on pipes."""
    return subprocess.Popen(
        launcher_command("--run-dir", str(cwd / "run"), "-n", str(WORLD), "--heartbeat-interval", "0.25", *args),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launcher_env(),
        start_new_session=True,
    )


def _status_json(run_dir: Path) -> dict:
    out = subprocess.run(
        launcher_command("status", "--run-dir", str(run_dir), "--json"), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _checked_events(run_dir: Path) -> list[dict]:
    """Every line of events.jsonl: each one JSON, valid against the schema, ``t`` never
    going back through the file."""
    pytest.importorskip("jsonschema")
    lines = (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
    events = []
    for number, line in enumerate(lines, 1):
        event = json.loads(line)  # a torn or non-JSON line fails here
        validate_event(event)
        if events:
            assert event["t"] >= events[-1]["t"], (
                f"line {number}: t went back from {events[-1]['t']} ({events[-1]['event']}) "
                f"to {event['t']} ({event['event']})"
            )
        events.append(event)
    assert events == read_events(run_dir / "events.jsonl")
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    return events


def _wait_for(condition, proc: subprocess.Popen, what: str, within_s: float = 60.0):
    """condition()'s first truthy value, asked every 0.1 s; fails at the deadline or when the
    launcher ends first."""
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: never happened (launcher exit {proc.poll()})")
        time.sleep(0.1)


def _events_now(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return read_events(path) if path.exists() else []


def _samples(events: list[dict], generation: int | None = None) -> list[dict]:
    """Progress events (of `generation`), each with its ranks as {rank: sample}."""
    return [
        {**e, "by_rank": {r["rank"]: r for r in e["ranks"]}}
        for e in events
        if e["event"] == "progress" and (generation is None or e["generation"] == generation)
    ]


def _states(events: list[dict], generation: int) -> dict[int, dict]:
    """The `state` events of `generation` by rank; exactly one per rank."""
    found = [e for e in events if e["event"] == "state" and e["generation"] == generation]
    assert sorted(e["rank"] for e in found) == list(range(WORLD)), found
    return {e["rank"]: e for e in found}


def _one(pattern: re.Pattern, lines: list[str]) -> re.Match:
    matches = [m for m in map(pattern.match, lines) if m]
    assert len(matches) == 1, f"{pattern.pattern!r} matched {len(matches)} lines:\n" + "\n".join(lines)
    return matches[0]


def _summary_lines(stderr: str) -> list[str]:
    """The end-of-run summary: its header and the indented lines under it."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if HEADER.match(line)]
    assert len(starts) == 1, stderr
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def _assert_same_loss(shown: str, mean: float | None, samples: dict[int, dict]) -> None:
    """The console's 4-digit loss, run_end's mean and the last progress sample's losses agree."""
    assert mean is not None
    assert shown == format_loss(mean)
    losses = [s["loss"] for s in samples.values()]
    assert None not in losses
    assert statistics.fmean(losses) == pytest.approx(mean, rel=1e-5)  # samples keep 6 digits


def _assert_summary_agrees(summary: list[str], end: dict, last: dict, *, restarts: int) -> re.Match:
    """The console summary against run_end's summary and the run's last progress sample."""
    figures = end["summary"]
    ranks = last["by_rank"]
    # run_end's wall_s has 3 decimals; the console rounds the unrounded one.
    wall = {format_duration(end["wall_s"] + d) for d in (-0.0005, 0.0, 0.0005)}
    assert _one(WALL_LINE, summary)[1] in wall
    # The registry's clock (progress samples, status) starts a little before the supervisor's
    # (wall_s): they agree to well within a generation's length.
    assert last["elapsed_s"] == pytest.approx(end["wall_s"], abs=2.0)
    step = _one(STEP_LINE, summary)
    assert int(step[1]) == figures["final_step"] == end["final_step"] == min(r["step"] for r in ranks.values())
    assert int(step[2]) == figures["total_steps"]
    assert int(step[3]) == figures["optimizer_steps"] == min(r["optimizer_steps"] for r in ranks.values())
    if step[4] is not None:
        assert int(step[4]) == max(r["optimizer_steps"] for r in ranks.values())
    assert figures["step_reported"] is True and all(r["reported_step"] is not None for r in ranks.values())
    assert int(_one(RESTARTS_LINE, summary)[1]) == end["restarts"] == restarts
    assert figures["generations"] == restarts + 1

    # samples is the furthest rank's count (the script reports the world's), while final_step is
    # the slowest rank's: a Ctrl-C can land between two ranks' reports of the same step.
    samples = max(r["samples"] for r in ranks.values())
    assert figures["samples"] == samples == max(r["reported_step"] for r in ranks.values()) * BATCH * WORLD
    if restarts:
        assert int(_one(SAMPLES_LINE, summary)[1]) == samples
    else:
        rate = _one(SAMPLES_RATE_LINE, summary)
        assert int(rate[2]) == samples
        assert float(rate[1]) == pytest.approx(samples / end["wall_s"], abs=0.11)

    loss = _one(LOSS_LINE, summary)
    assert int(loss[2]) == WORLD
    _assert_same_loss(loss[1], figures["last_loss_mean_over_ranks"], ranks)

    rate_line = _one(RATE_LINE, summary)
    spread = figures["steps_per_s"]
    assert [rate_line[1], rate_line[2], rate_line[3]] == [
        rate_number(spread["min"]),
        rate_number(spread["median"]),
        rate_number(spread["max"]),
    ]
    assert int(rate_line[4]) == figures["slowest_rank"], "the console and run_end name different slowest ranks"
    return step


def _plain_lines(stderr: str) -> list[re.Match]:
    lines = [PLAIN_LINE.match(line) for line in stderr.splitlines() if line.startswith("[ddp-launch] step ")]
    assert lines and all(lines), stderr
    return lines


def _report_rows(run_dir: Path) -> tuple[dict, dict[int, dict]]:
    data = load_report_data(run_dir)
    return data, {row["rank"]: row for row in data["ranks"]}


# -- a kill and a restart --------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_kill_and_restart_figures_agree_everywhere(tmp_path):
    run_dir = tmp_path / "run"
    total = 160
    proc = _start(tmp_path, "--max-restarts", "1", "--stop-grace", "2", TRAIN, str(total), PAUSE_S,
                  str(tmp_path / "ckpt.pt"))  # fmt: skip
    try:

        def both_train(s: dict) -> bool:
            return s["generation"] == 0 and all(r["state"] == "training" and r["step"] >= 40 for r in s["ranks"])

        status = poll_status(run_dir, until=both_train, timeout_s=90)
        assert status is not None and both_train(status), status
        # One status read, between two progress samples of the event log.
        before = time.time()
        status = _status_json(run_dir)
        after = time.time()
        _wait_for(lambda: any(e["t"] > after for e in _samples(_events_now(run_dir), 0)), proc, "a later sample")
        live_events = _events_now(run_dir)
        pid = {r["rank"]: r["pid"] for r in status["ranks"]}
        os.kill(pid[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, stderr

    # -- status --json against the event log at about that time -------------------------------
    assert status["world_size"] == WORLD and status["generation"] == 0 and status["restarts"] == 0
    assert status["max_restarts"] == 1 and status["total_steps"] == total
    gen0 = _samples(live_events, 0)
    earlier = [s for s in gen0 if s["t"] < before]
    later = [s for s in gen0 if s["t"] > after]
    assert earlier and later
    registered = {e["rank"]: e for e in live_events if e["event"] == "register" and e["generation"] == 0}
    assert not [e for e in live_events if e["event"] == "state"], "a rank ended before the kill"
    for r in status["ranks"]:
        assert set(SAMPLE_FIELDS) <= set(r), "status --json lacks a field of the progress samples"
        rank = r["rank"]
        assert r["state"] == "training" and r["generation"] == 0 and r["exit"] is None
        assert (r["node_rank"], r["pid"], r["hostname"]) == (
            registered[rank]["node_rank"],
            registered[rank]["pid"],
            registered[rank]["hostname"],
        )
        low, high = earlier[-1]["by_rank"].get(rank), later[0]["by_rank"][rank]
        for name in ("step", "optimizer_steps", "reported_step", "samples"):
            low_value = 0 if low is None or low[name] is None else low[name]
            assert low_value <= r[name] <= high[name], (name, low, r, high)
        # No resume in generation 0: the script's step is its optimizer steps, in both views
        # (or one behind, when a heartbeat fell between optimizer.step() and report()).
        for seen in (r, high):
            assert seen["step"] == seen["reported_step"] in (seen["optimizer_steps"], seen["optimizer_steps"] - 1)
        assert r["samples"] == r["step"] * BATCH * WORLD

    # -- the event log of the whole run -------------------------------------------------------
    events = _checked_events(run_dir)
    end = events[-1]
    assert end["outcome"] == "succeeded" and end["exit_code"] == 0 and end["restarts"] == 1
    assert [e["pid"] for e in events if e["event"] == "register" and e["rank"] == 1][0] == pid[1]
    ended = _states(events, 0)
    assert ended[1]["state"] == "failed" and ended[1]["exit"] == "signal SIGKILL" and ended[1]["exit_code"] == -9
    assert ended[1]["previous"] == "training"
    assert ended[0]["state"] == "stopped", f"rank 0, stopped by the launcher, is recorded as {ended[0]['state']}"
    assert ended[0]["previous"] == "training"
    for e in ended.values():
        assert set(e) - {"v", "t", "event", "previous"} <= set(status["ranks"][0]), "a state field status lacks"
    assert ended[1]["step"] >= status["ranks"][1]["step"]
    assert {e["state"] for e in _states(events, 1).values()} == {"done"}
    failure = [e for e in events if e["event"] == "failure"]
    assert len(failure) == 1 and failure[0]["generation"] == 0 and failure[0]["root_rank"] == 1
    assert failure[0]["outcome"] == "failed"
    restart = [e for e in events if e["event"] == "restart"]
    assert len(restart) == 1
    assert restart[0]["generation"] == 1 and restart[0]["rank"] == 1 and restart[0]["exit"] == "signal SIGKILL"
    assert "rank 1" in restart[0]["reason"]
    # Generation 0's last sample is read after its group stopped: the steps the ranks ended at.
    last0 = _samples(events, 0)[-1]
    assert last0["t"] >= max(e["t"] for e in ended.values())
    for rank, e in ended.items():
        sample = last0["by_rank"][rank]
        assert (sample["step"], sample["optimizer_steps"], sample["reported_step"]) == (
            e["step"],
            e["optimizer_steps"],
            e["reported_step"],
        ), f"rank {rank}: the state event and the last progress sample disagree"

    # -- the console: the restart line, the live view, the summary ----------------------------
    err_lines = stderr.splitlines()
    line = _one(RESTART_LINE, err_lines)
    assert line[1] == "1" and line[2] == "signal SIGKILL", line[0]
    assert (line[4], line[5], line[6]) == ("1", "1", "1"), line[0]
    assert int(line[3]) == ended[1]["step"] == last0["by_rank"][1]["step"], line[0]
    summary = _summary_lines(stderr)
    assert HEADER.match(summary[0])[2] == "2/2 done"
    last = _samples(events)[-1]
    assert last["generation"] == 1
    step = _assert_summary_agrees(summary, end, last, restarts=1)
    assert int(step[5]) == 1 and int(step[7]) == 2
    all_opt = min(r["optimizer_steps"] for r in last0["ranks"]) + end["summary"]["optimizer_steps"]
    assert int(step[6]) == end["summary"]["optimizer_steps_all_generations"] == all_opt
    # Generation 1 resumed from rank 0's last save (every 10 steps) before its stop, and did
    # the rest. The steps the launcher knows are its last heartbeats' (0.25 s apart, 5 steps):
    # rank 0 may have saved a few steps past them, never a whole save interval.
    resumed = re.search(r"^\[rank 0\] rank 0 resuming at step (\d+)$", stdout, re.M)
    assert resumed, stdout
    assert int(resumed[1]) % 10 == 0 and ended[0]["step"] - 10 < int(resumed[1]) < ended[0]["step"] + 10
    assert end["summary"]["optimizer_steps"] == total - int(resumed[1])
    plain = _plain_lines(stderr)
    final = plain[-1]
    assert (int(final[1]), int(final[2])) == (end["final_step"], total)
    assert final[5] == "2/2 done" and final[6] == "gen 1 (restart 1/1)"
    assert final[4] == format_loss(end["summary"]["last_loss_mean_over_ranks"])
    assert not (run_dir / "failure.json").exists(), "a run that recovered left a failure report"

    # -- no resume spike: rates after the restart are of the same order as before the kill ----
    killed_at = next(e["t"] for e in events if e["event"] == "state")
    rates_before = [
        r["steps_per_s"] for s in _samples(events, 0) if s["t"] < killed_at for r in s["ranks"] if r["steps_per_s"] > 0
    ]
    assert len(rates_before) >= 2, "too few samples before the kill"
    limit = 2 * statistics.median(rates_before)
    rates_after = [r["steps_per_s"] for s in _samples(events, 1) for r in s["ranks"]]
    assert rates_after and max(rates_after) <= limit, (rates_after, limit)
    view_after = [
        float(m[3].split()[0]) for m in plain if m[6] != "gen 0" and m[3].endswith(" it/s") and m[3][0] != "?"
    ]
    assert max(view_after, default=0.0) <= limit, (view_after, limit)
    assert end["summary"]["steps_per_s"]["max"] <= limit

    # -- the report's data ---------------------------------------------------------------------
    data, rows = _report_rows(run_dir)
    assert data["outcome"] == "succeeded" and data["restarts"] == 1
    assert data["run_end"]["final_step"] == end["final_step"]
    assert {rank: row["failures"] for rank, row in rows.items()} == {0: 0, 1: 1}
    for rank, row in rows.items():
        assert row["state"] == "done" and row["restarts"] == 1
        assert row["final_step"] == last["by_rank"][rank]["step"]
        assert row["last_loss"] == last["by_rank"][rank]["loss"]
    markers = [m for m in data["markers"] if m["kind"] != "straggler"]
    assert [(m["kind"], m["generation"]) for m in markers] == [("failure", 0), ("restart", 1)], markers
    assert "rank 1" in markers[0]["label"]
    assert data["failure"]["root_rank"] == 1


# -- Ctrl-C ----------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_ctrl_c_figures_agree_everywhere_and_nothing_failed(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(tmp_path, "--stop-grace", "5", TRAIN, "100000", PAUSE_S, str(tmp_path / "ckpt.pt"))
    try:

        def both_stepped() -> bool:
            samples = _samples(_events_now(run_dir), 0)
            return any(len(s["ranks"]) == WORLD and all(r["step"] >= 10 for r in s["ranks"]) for s in samples)

        _wait_for(both_stepped, proc, "a progress sample with both ranks training", within_s=90)
        status = poll_status(run_dir, until=lambda s: all(r["state"] == "training" for r in s["ranks"]))
        assert status is not None and all(r["state"] == "training" for r in status["ranks"]), status
        before_signal = _samples(_events_now(run_dir), 0)[-1]
        proc.send_signal(signal.SIGINT)  # the launcher only, not its group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 130, stderr

    # -- the event log -------------------------------------------------------------------------
    events = _checked_events(run_dir)
    end = events[-1]
    assert end["outcome"] == "interrupted" and end["exit_code"] == 130 and end["restarts"] == 0
    ended = _states(events, 0)
    assert {rank: e["state"] for rank, e in ended.items()} == {0: "interrupted", 1: "interrupted"}, ended
    assert not [e for e in events if e["event"] in ("failure", "restart")]
    last = _samples(events)[-1]
    assert last["t"] >= max(e["t"] for e in ended.values())

    # -- failure.json: interrupted, and where every rank was last -----------------------------
    report = json.loads((run_dir / "failure.json").read_text())
    assert report["outcome"] == "interrupted" and report["message"] == "stopped by SIGINT"
    assert report["root_cause"] is None, "an interrupted run names a root cause"
    assert report["restarts"] == 0 and [g["outcome"] for g in report["generations"]] == ["interrupted"]
    ranks = {r["rank"]: r for r in report["ranks"]}
    assert sorted(ranks) == list(range(WORLD))
    for rank, r in ranks.items():
        assert r["state"] == "interrupted", r
        known = before_signal["by_rank"][rank]
        assert r["step"] >= known["step"] and r["optimizer_steps"] >= known["optimizer_steps"], (
            f"rank {rank}: failure.json has step {r['step']}, older than the sample before Ctrl-C ({known['step']})"
        )
        sample = last["by_rank"][rank]
        assert (r["step"], r["optimizer_steps"], r["reported_step"]) == (
            sample["step"],
            sample["optimizer_steps"],
            sample["reported_step"],
        ), f"rank {rank}: failure.json and the last progress sample disagree"
        state = ended[rank]
        for name in ("state", "step", "optimizer_steps", "reported_step", "exit_code", "exit"):
            assert r[name] == state[name], f"rank {rank}'s {name}: failure.json {r[name]!r}, event {state[name]!r}"

    # -- the console ---------------------------------------------------------------------------
    own = [line for line in stderr.splitlines() if not line.startswith("[rank ")]
    assert not [line for line in own if "failed" in line], "\n".join(own)
    assert "ddp-launch: run interrupted: stopped by SIGINT" in own
    summary = _summary_lines(stderr)
    assert HEADER.match(summary[0])[2] == "2/2 interrupted"
    _assert_summary_agrees(summary, end, last, restarts=0)
    shown = {int(m[1]): (m[2], int(m[3])) for m in map(REPORT_RANK_LINE.match, own) if m}
    assert shown == {rank: ("interrupted", r["step"]) for rank, r in ranks.items()}, own
    final = _plain_lines(stderr)[-1]
    assert final[5] == "2/2 interrupted" and int(final[1]) == end["final_step"], final[0]

    # -- the report's data ---------------------------------------------------------------------
    data, rows = _report_rows(run_dir)
    assert data["outcome"] == "interrupted" and data["failure"]["outcome"] == "interrupted"
    kinds = [m["kind"] for m in data["markers"]]
    assert "interrupted" in kinds and "failure" not in kinds, data["markers"]
    for rank, row in rows.items():
        assert row["state"] == "interrupted" and row["failures"] == 0, row
        assert row["final_step"] == ranks[rank]["step"]
