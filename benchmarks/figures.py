"""The side-by-side figures: both launchers on the same workload, in alternating pairs.

Pair i runs ddp-launch then torchrun when i is even, torchrun then ddp-launch when odd, so
neither launcher always gets the warmer page cache or the quieter minute. Every run gets a
fresh temporary directory (its marks, logs and ddp-launch run dir), removed afterwards.

Runs and what they give:

* train (N=2, N=4): start-up (command -> every rank's first step), throughput (rank 0's
  steps/s from step 20 to step 20+M), the run's wall time, and at N=4 the launcher
  process's own CPU time and peak RSS, all from the same run.
* recovery (N=4, ``--max-restarts 1``): rank 1 exits 1 at step K of generation 0; from its
  death to every rank's first step in generation 1.
* hang (N=4): rank 1 sleeps forever at step K of generation 0; ddp-launch with
  ``--hang-timeout 10 --max-restarts 1``: from the hang to every rank's first step in
  generation 1. torchrun has no hang detection: it gets a bound, then its tree is killed.
* output (N=2): every rank prints 200,000 lines as fast as it can (`print_lines.py`);
  the script's own time to print them (its slowest rank) and the run's wall time. torchrun
  runs with ``--tee 3 --log-dir D``: like ddp-launch, it then shows every line prefixed on
  the console and keeps it in a file per rank.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import DDP_LAUNCH, TORCHRUN, WORKLOAD, RunOutcome, base_env, launcher_command, run_launcher
from benchmarks.stats import Figure

PRINT_LINES = Path(__file__).resolve().parent / "print_lines.py"

# torch 2.13's agent shares one rendezvous TCP store across restarts; its restarts then
# often fail in gloo's connectFullMesh. This is the setting under which torchrun recovers
# (see ANCHORS.md), so it is the baseline restarts are compared with.
TORCHRUN_RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    pairs: int
    train_nprocs: tuple[int, ...]  # world sizes of the train runs
    fault_nproc: int  # world size of the recovery and hang runs
    window_from: int  # throughput: rank 0's steps from window_from ...
    window_steps: int  # ... to window_from + window_steps
    fault_rank: int
    fault_step: int
    hang_timeout_s: float
    torchrun_hang_bound_s: float
    run_timeout_s: float
    stop_early: bool = False  # end recovery / hang runs once generation 1 has stepped
    tmp_root: Path | None = None
    output_lines: int = 200_000  # lines each rank prints in the output figure

    @property
    def train_steps(self) -> int:
        return self.window_from + self.window_steps + 2


Progress = Callable[[str], None]


def _order(pair: int) -> tuple[str, str]:
    return (DDP_LAUNCH, TORCHRUN) if pair % 2 == 0 else (TORCHRUN, DDP_LAUNCH)


def _first_steps(marks: dict[str, list[float]], generation: int, nproc: int) -> list[float] | None:
    found = [marks.get(f"first-step-gen{generation}-rank{r}") for r in range(nproc)]
    if any(not m for m in found):
        return None
    return [m[0] for m in found]  # type: ignore[index]


def _describe(outcome: RunOutcome, what: str) -> str:
    if outcome.timed_out:
        state = f"killed after {outcome.wall_s:.0f} s (timeout)"
    elif outcome.stopped:
        state = f"stopped after {outcome.wall_s:.0f} s"
    else:
        state = f"exit code {outcome.exit_code} after {outcome.wall_s:.1f} s"
    tail = " | ".join(line for line in outcome.log_tail.strip().splitlines()[-6:] if line.strip())
    return f"{what}; {state}; log tail: {tail[-600:]}"


class _Runner:
    """Runs one launcher once in a fresh temporary directory and cleans it up."""

    def __init__(self, settings: Settings, records: list[dict]) -> None:
        self.settings = settings
        self.records = records

    def run(
        self,
        figure_group: str,
        pair: int,
        launcher: str,
        nproc: int,
        script_args: list[str],
        *,
        bench_env: dict[str, str],
        max_restarts: int = 0,
        hang_timeout_s: float | None = None,
        timeout_s: float | None = None,
        stop_when=None,
        measure_usage: bool = False,
        script: Path = WORKLOAD,
        torchrun_tee_logs: bool = False,
        events: list[dict] | None = None,
    ) -> RunOutcome:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{figure_group}-", dir=self.settings.tmp_root))
        try:
            marks = tmp / "marks"
            marks.mkdir()
            extra = {"BENCH_DIR": str(marks), "TMPDIR": str(tmp), **bench_env}
            if launcher == TORCHRUN and max_restarts:
                extra.update(TORCHRUN_RESTART_ENV)
            cmd = launcher_command(
                launcher,
                nproc,
                script_args,
                run_dir=tmp / "run",
                max_restarts=max_restarts,
                hang_timeout_s=hang_timeout_s,
                script=script,
                torchrun_args=("--tee", "3", "--log-dir", str(tmp / "logs")) if torchrun_tee_logs else (),
            )
            outcome = run_launcher(
                launcher,
                cmd,
                env=base_env(extra),
                workdir=tmp,
                marks_dir=marks,
                timeout_s=timeout_s or self.settings.run_timeout_s,
                stop_when=stop_when,
                measure_usage=measure_usage,
            )
            if events is not None and launcher == DDP_LAUNCH:  # read before the directory goes
                events += _read_events(tmp / "run" / "events.jsonl")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.records.append(
            {
                "group": figure_group,
                "pair": pair,
                "launcher": launcher,
                "nproc": nproc,
                "exit_code": outcome.exit_code,
                "timed_out": outcome.timed_out,
                "stopped": outcome.stopped,
                "wall_s": round(outcome.wall_s, 3),
                "leftover_pids": outcome.leftovers,
            }
        )
        return outcome


def train_figures(settings: Settings, wanted: set[str], records: list[dict], say: Progress) -> list[Figure]:
    """Start-up, throughput, wall time and launcher overhead, from the same train runs."""
    figures: dict[str, Figure] = {}
    steps = settings.train_steps if "throughput" in wanted else 5
    for n in settings.train_nprocs:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        over = f" (oversubscribed: {n} processes on {cpus} cores)" if n > cpus else ""
        if "startup" in wanted:
            figures[f"startup_n{n}"] = Figure(
                f"startup_n{n}",
                f"start-up, N={n}: command -> every rank's first optimizer step{over}",
                "s",
                "lower",
                "<= 0.5x torchrun" if n == 4 else "(none; N=4 is the target)",
                target_ratio=0.5 if n == 4 else None,
            )
        if "throughput" in wanted:
            figures[f"throughput_n{n}"] = Figure(
                f"throughput_n{n}",
                f"throughput, N={n}: rank 0's steps/s, steps {settings.window_from}.."
                f"{settings.window_from + settings.window_steps}{over}",
                "steps/s",
                "higher",
                ">= 0.98x torchrun",
                target_ratio=0.98,
            )
            figures[f"step_cpu_n{n}"] = Figure(
                f"step_cpu_n{n}",
                f"CPU per step, N={n}: rank 0's CPU time (all its threads) per step in the same window",
                "ms",
                "lower",
                "(no target; tells more work per step from less CPU given)",
            )
        if "overhead" in wanted and n == 4:
            figures["overhead_cpu_n4"] = Figure(
                "overhead_cpu_n4",
                "launcher overhead, N=4: the launcher process's own CPU time (user+sys)",
                "s",
                "lower",
                "<= 1.0x torchrun",
                target_ratio=1.0,
                note="ddp-launch: its main process (gRPC master, supervisor, output pump), not the "
                "forkserver or workers; torchrun: its agent process (the torchrun pid)",
            )
            figures["overhead_rss_n4"] = Figure(
                "overhead_rss_n4",
                "launcher overhead, N=4: the launcher process's peak RSS",
                "MB",
                "lower",
                "<= 1.0x torchrun",
                target_ratio=1.0,
            )
        if "startup" in wanted or "throughput" in wanted:
            figures[f"wall_n{n}"] = Figure(
                f"wall_n{n}",
                f"whole run, N={n}: command -> launcher exit, {steps} steps{over}",
                "s",
                "lower",
                "(no target; shows start-up plus shut-down)",
            )
    if not figures:
        return []
    args = ["--epochs", "1000", "--max-steps", str(steps)]
    window_to = settings.window_from + settings.window_steps
    bench_env = {"BENCH_WINDOW_FROM": str(settings.window_from), "BENCH_WINDOW_TO": str(window_to)}
    runner = _Runner(settings, records)
    for n in settings.train_nprocs:
        for pair in range(settings.pairs):
            for launcher in _order(pair):
                say(f"train N={n} pair {pair + 1}/{settings.pairs}: {launcher}")
                measure = f"overhead_cpu_n{n}" in figures
                o = runner.run("train", pair, launcher, n, args, bench_env=bench_env, measure_usage=measure)
                ok = o.exit_code == 0
                firsts = _first_steps(o.marks, 0, n)
                fig = figures.get(f"startup_n{n}")
                if fig is not None:
                    if firsts:
                        fig.add(launcher, pair, max(firsts) - o.started_at, exit_code=o.exit_code)
                    else:
                        fig.add(
                            launcher, pair, None, _describe(o, "not every rank reached its first step"), o.exit_code
                        )
                fig = figures.get(f"throughput_n{n}")
                if fig is not None:
                    window = o.marks.get("window-gen0-rank0")
                    cpu_fig = figures[f"step_cpu_n{n}"]
                    if window and len(window) == 4 and window[1] > window[0]:
                        fig.add(launcher, pair, settings.window_steps / (window[1] - window[0]), exit_code=o.exit_code)
                        cpu_ms = 1000 * (window[3] - window[2]) / settings.window_steps
                        cpu_fig.add(launcher, pair, cpu_ms, exit_code=o.exit_code)
                    else:
                        error = _describe(o, "rank 0 did not get through the window")
                        fig.add(launcher, pair, None, error, o.exit_code)
                        cpu_fig.add(launcher, pair, None, error, o.exit_code)
                fig = figures.get(f"wall_n{n}")
                if fig is not None:
                    if ok:
                        fig.add(launcher, pair, o.wall_s, exit_code=o.exit_code)
                    else:
                        fig.add(launcher, pair, None, _describe(o, "the run did not succeed"), o.exit_code)
                if measure:
                    for key, value in (
                        ("overhead_cpu_n4", o.cpu_s),
                        ("overhead_rss_n4", o.peak_rss_bytes / MB if o.peak_rss_bytes else None),
                    ):
                        if ok and value:
                            figures[key].add(launcher, pair, value, exit_code=o.exit_code)
                        else:
                            figures[key].add(launcher, pair, None, _describe(o, "no usage figure"), o.exit_code)
    return list(figures.values())


def _read_events(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def recovery_breakdown(death: float, events: list[dict], first_steps: list[float], bad: int) -> dict[str, float]:
    """Where a recovery's time went, from the run's events and the workload's marks:

    * seen: the fault -> the registry's record of the rank's death (the sentinel woke the
      supervisor and it recorded the exit)
    * stopped: -> the `restart` event (the other ranks stopped, the failure logged)
    * forked: -> the first `register` of generation 1 (the standby told to go, or a fork
      from the warm forkserver when there was none; the worker's bootstrap, its Register RPC)
    * barrier: -> `barrier_open` of generation 1 (every rank registered)
    * first_step: -> every rank's first optimizer step (init_process_group, DDP's
      construction, the first step itself)
    """

    def first(kind: str, generation: int, **match: object) -> float | None:
        times = [
            e["t"]
            for e in events
            if e.get("event") == kind and e.get("generation") == generation
            and all(e.get(k) == v for k, v in match.items())
        ]  # fmt: skip
        return min(times) if times else None

    seen = first("state", 0, rank=bad, state="failed")
    marks = [("seen", seen), ("stopped", first("restart", 1)), ("forked", first("register", 1)),
             ("barrier", first("barrier_open", 1)), ("first_step", max(first_steps))]  # fmt: skip
    out, previous = {}, death
    for stage, at in marks:
        if at is None:
            continue
        out[stage] = round(at - previous, 4)
        previous = at
    return out


def recovery_figure(settings: Settings, records: list[dict], say: Progress) -> Figure:
    n, k, bad = settings.fault_nproc, settings.fault_step, settings.fault_rank
    fig = Figure(
        f"recovery_n{n}",
        f"recovery, N={n}: rank {bad} exits 1 at step {k} -> every rank's first step in generation 1",
        "s",
        "lower",
        "<= 0.25x torchrun",
        target_ratio=0.25,
        note="--max-restarts 1 on both; torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
    )
    runner = _Runner(settings, records)
    args = ["--epochs", "1000", "--max-steps", str(k + 5)]
    bench_env = {"BENCH_FAULT": "exit", "BENCH_FAULT_RANK": str(bad), "BENCH_FAULT_STEP": str(k)}

    def recovered(now: float, marks: dict[str, list[float]]) -> bool:
        return _first_steps(marks, 1, n) is not None

    stop_when = recovered if settings.stop_early else None
    for pair in range(settings.pairs):
        for launcher in _order(pair):
            say(f"recovery N={n} pair {pair + 1}/{settings.pairs}: {launcher}")
            events: list[dict] = []
            o = runner.run(
                "recovery", pair, launcher, n, args, bench_env=bench_env, max_restarts=1, stop_when=stop_when,
                events=events,
            )  # fmt: skip
            death = o.marks.get(f"fault-gen0-rank{bad}")
            again = _first_steps(o.marks, 1, n)
            if death and again:
                fig.add(launcher, pair, max(again) - death[0], exit_code=o.exit_code)
                if launcher == DDP_LAUNCH:
                    stages = recovery_breakdown(death[0], events, again, bad)
                    fig.breakdown.append(stages)
                    say("  " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items()))
            else:
                what = "the fault did not fire" if not death else "generation 1 never had every rank step"
                fig.add(launcher, pair, None, _describe(o, what), o.exit_code)
    summary = fig.to_json()
    for name, got in summary["launchers"].items():
        if got["n"]:
            say(f"recovery N={n} {name}: p50 {got['median']:.3f} s, p90 {got['p90']:.3f} s, p99 {got['p99']:.3f} s")
    if "vs_torchrun_median" in summary:
        say(f"recovery N={n} ddp-launch / torchrun's median: {summary['vs_torchrun_median']}")
        say(f"recovery N={n} where the time went (medians): {summary['breakdown_median_s']}")
    return fig


HANG_SLACK_S = 2.0


def hang_figure(settings: Settings, records: list[dict], say: Progress) -> Figure:
    n, k, bad = settings.fault_nproc, settings.fault_step, settings.fault_rank
    bound = settings.torchrun_hang_bound_s
    # The target is 12 s at --hang-timeout 10: the timeout plus 2 s to detect, dump and restart.
    target_s = settings.hang_timeout_s + HANG_SLACK_S
    fig = Figure(
        f"hang_n{n}",
        f"hang, N={n}: rank {bad} sleeps forever at step {k} -> every rank's first step in generation 1",
        "s",
        "lower",
        f"<= {target_s:g} s; torchrun: not detected",
        target_abs=target_s,
        note=f"ddp-launch --hang-timeout {settings.hang_timeout_s:g} --max-restarts 1; torchrun --max-restarts 1 "
        f"has no hang detection: each run is given {bound:g} s after the hang, then its whole tree is killed",
    )
    fig.bound_s = bound
    runner = _Runner(settings, records)
    args = ["--epochs", "1000", "--max-steps", str(k + 5)]
    bench_env = {"BENCH_FAULT": "hang", "BENCH_FAULT_RANK": str(bad), "BENCH_FAULT_STEP": str(k)}
    hang_mark = f"fault-gen0-rank{bad}"

    def bounded(now: float, marks: dict[str, list[float]]) -> bool:
        hang = marks.get(hang_mark)
        return bool(hang) and (_first_steps(marks, 1, n) is not None or now - hang[0] > bound)

    def recovered(now: float, marks: dict[str, list[float]]) -> bool:
        return _first_steps(marks, 1, n) is not None

    for pair in range(settings.pairs):
        for launcher in _order(pair):
            say(f"hang N={n} pair {pair + 1}/{settings.pairs}: {launcher}")
            if launcher == DDP_LAUNCH:
                o = runner.run(
                    "hang", pair, launcher, n, args, bench_env=bench_env, max_restarts=1,
                    hang_timeout_s=settings.hang_timeout_s, stop_when=recovered if settings.stop_early else None,
                )  # fmt: skip
            else:
                o = runner.run(
                    "hang", pair, launcher, n, args, bench_env=bench_env, max_restarts=1,
                    timeout_s=settings.run_timeout_s + bound, stop_when=bounded,
                )  # fmt: skip
            hang = o.marks.get(hang_mark)
            again = _first_steps(o.marks, 1, n)
            if hang and again:
                fig.add(launcher, pair, max(again) - hang[0], exit_code=o.exit_code)
            elif hang and launcher == TORCHRUN and (o.stopped or o.timed_out):
                fig.add_not_detected(launcher, pair, o.exit_code)
            else:
                what = "the hang was not injected" if not hang else "no restarted generation stepped"
                fig.add(launcher, pair, None, _describe(o, what), o.exit_code)
    return fig


OUTPUT_NPROC = 2


def output_figures(settings: Settings, records: list[dict], say: Progress) -> list[Figure]:
    """How fast each launcher takes a worker's output: N=2 ranks print as fast as they can."""
    n, lines = OUTPUT_NPROC, settings.output_lines
    printing = Figure(
        f"output_print_n{n}",
        f"worker output, N={n}: the script's own time to print {lines:,} lines per rank (its slowest rank)",
        "s",
        "lower",
        "<= 1.0x torchrun",
        target_ratio=1.0,
        note="torchrun --tee 3 --log-dir D (every line on the console, prefixed, and in a file per rank, as "
        "ddp-launch does by default); both launchers' console is a file",
    )
    wall = Figure(
        f"output_wall_n{n}",
        f"worker output, N={n}: command -> launcher exit, {lines:,} lines per rank",
        "s",
        "lower",
        "(no target; start-up and shut-down included)",
    )
    runner = _Runner(settings, records)
    for pair in range(settings.pairs):
        for launcher in _order(pair):
            say(f"output N={n} pair {pair + 1}/{settings.pairs}: {launcher}")
            o = runner.run(
                "output", pair, launcher, n, [], bench_env={"BENCH_LINES": str(lines)},
                script=PRINT_LINES, torchrun_tee_logs=True,
            )  # fmt: skip
            marks = [o.marks.get(f"print-gen0-rank{r}") for r in range(n)]
            if all(m and len(m) == 4 for m in marks):
                printing.add(launcher, pair, max(m[3] - m[2] for m in marks), exit_code=o.exit_code)  # type: ignore[index]
            else:
                printing.add(launcher, pair, None, _describe(o, "not every rank printed its lines"), o.exit_code)
            if o.exit_code == 0:
                wall.add(launcher, pair, o.wall_s, exit_code=o.exit_code)
            else:
                wall.add(launcher, pair, None, _describe(o, "the run did not succeed"), o.exit_code)
    return [printing, wall]
