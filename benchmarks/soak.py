"""python -m benchmarks.soak [--runs 200] [--seed 0] [--out FILE.json]
(also ``python -m benchmarks --figures soak``; never part of CI: about half an hour)

Runs examples/train_mlp.py (through benchmarks/soak_train.py, which records every rank's
steps) under ddp-launch at N=4 with ``--max-restarts 3``, a snapshot after every step (no
budget: ``--snapshot-budget 0``), and
injects one or two faults per run at random moments (2 to 40 steps into a generation), from
outside, by pid:

======================  =====================================================================
worker-sigkill/-sigterm  a random rank's worker gets the signal
worker-sigstop           a random rank stops (a hang; ``--hang-timeout 3``)
loader-sigkill           one of a rank's DataLoader worker processes is SIGKILLed
two-workers              two ranks SIGKILLed 0.2 s apart
during-restart           a rank SIGKILLed, then a rank of the next generation as soon as it
                         starts, before its first step
forkserver-sigkill       the warm forkserver every worker is forked from
launcher-sigkill         the launcher itself (ends the run: nothing may be left behind)
launcher-sigint          Ctrl-C to the launcher (ends the run with exit 130)
======================  =====================================================================

The first fault of run i is kind i mod 9, so each kind is tried about as often; half the
runs that survive it get a second fault of a random kind, within the restart budget.

A run is **ok** when it ends as it must (exit 0 with every step done; 130 after a SIGINT;
killed after a SIGKILL of the launcher), within 120 s (else it is **wedged**, and killed),
with none of the processes ever seen below the launcher alive 15 s after it ended, and when
no restart redid more than one step (the last step of a generation against the first step
of the next one that trained). The JSON has every run, and each failure with its log's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.procs import DDP_LAUNCH, base_env, launcher_command

HERE = Path(__file__).resolve().parent
SOAK_TRAIN = HERE / "soak_train.py"
NPROC, STEPS, MAX_RESTARTS = 4, 200, 3
RUN_TIMEOUT_S, LEFTOVER_S, PHASE_S = 120.0, 15.0, 60.0
# The restarts each kind may cost at worst: two faults of a run stay within --max-restarts.
KINDS = {
    "worker-sigkill": 1,
    "worker-sigterm": 1,
    "worker-sigstop": 1,
    "loader-sigkill": 1,
    "two-workers": 2,
    "during-restart": 2,
    "forkserver-sigkill": 1,
    "launcher-sigkill": 0,
    "launcher-sigint": 0,
}
ENDS_THE_RUN = ("launcher-sigkill", "launcher-sigint")


class Ended(Exception):
    """The run ended (or stalled) before the fault could be aimed."""


@dataclass
class Run:
    """One launcher run and what the soak saw of it."""

    index: int
    faults: list[str]
    where: Path
    proc: subprocess.Popen | None = None
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create time, all ever below it
    injected: list[str] = field(default_factory=list)
    injected_at: list[int] = field(default_factory=list)  # the step each fault came at (rank 0's last)

    @property
    def records(self) -> Path:
        return self.where / "steps"

    def start(self) -> None:
        self.records.mkdir(parents=True)
        args = ["--max-steps", str(STEPS), "--epochs", "1000", "--checkpoint", str(self.where / "ckpt.pt"),
                "--checkpoint-every", "50", "--snapshot-budget", "0"]  # fmt: skip
        if "loader-sigkill" in self.faults:
            args += ["--loader-workers", "1"]
        cmd = launcher_command(
            DDP_LAUNCH, NPROC, args, run_dir=self.where / "run", max_restarts=MAX_RESTARTS, hang_timeout_s=3.0,
            script=SOAK_TRAIN,
        )  # fmt: skip
        env = base_env({"SOAK_DIR": str(self.records)})
        with open(self.where / "stdout", "wb") as out, open(self.where / "stderr", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=self.where, start_new_session=True)
        threading.Thread(target=self._watch_tree, daemon=True).start()

    def _watch_tree(self) -> None:
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            self.seen[root.pid] = root.create_time()
            while self.proc.poll() is None:
                for p in root.children(recursive=True):
                    try:
                        self.seen.setdefault(p.pid, p.create_time())
                    except psutil.Error:
                        pass
                time.sleep(0.05)
        except psutil.Error:
            return

    # What the records say.
    def _lines(self, generation: int, rank: int) -> list[str]:
        try:
            return (self.records / f"steps-gen{generation}-rank{rank}").read_text().splitlines()
        except FileNotFoundError:
            return []

    def pid(self, generation: int, rank: int) -> int | None:
        lines = self._lines(generation, rank)
        if lines and lines[0].startswith("pid "):
            pid = int(lines[0].split()[1])
            self.seen.setdefault(pid, _create_time(pid))
            return pid
        return None

    def steps(self, generation: int, rank: int) -> list[int]:
        return [int(x) for x in self._lines(generation, rank)[1:] if x.isdigit()]

    def generations(self) -> list[int]:
        found = {int(p.name.split("-")[1][3:]) for p in self.records.glob("steps-gen*-rank*")}
        return sorted(found)

    def trained(self, generation: int) -> bool:
        return all(self.steps(generation, r) for r in range(NPROC))

    def redone(self) -> list[int]:
        """Per restart that trained again: the steps done twice."""
        stepping = [g for g in self.generations() if any(self.steps(g, r) for r in range(NPROC))]
        out = []
        for before, after in zip(stepping, stepping[1:], strict=False):
            last = max(max(self.steps(before, r), default=0) for r in range(NPROC))
            first = min(self.steps(after, r)[0] for r in range(NPROC) if self.steps(after, r))
            out.append(last - (first - 1))
        return out

    def final_step(self) -> int:
        """The last step rank 0 did, in any generation."""
        return max((max(self.steps(g, 0), default=0) for g in self.generations()), default=0)

    def wait_for(self, what: str, condition, timeout_s: float = PHASE_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.proc.poll() is not None:
                raise Ended(f"the run ended before {what}")
            if time.monotonic() > deadline:
                raise Ended(f"no {what} within {timeout_s:g} s")
            time.sleep(0.02)


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie (an orphan the launcher has not reaped yet)
        return ""


def _signal(pid: int | None, sig: int) -> None:
    if pid is not None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def inject(run: Run, kind: str, rng: random.Random, after: int) -> int:
    """Aim one fault at the first generation after `after` that trains, at a random moment;
    return the last generation it hit."""
    assert run.proc is not None
    run.wait_for(f"a generation after {after}", lambda: max(run.generations(), default=-1) > after)
    gen = max(run.generations())
    run.wait_for(f"generation {gen} training", lambda: run.trained(gen))
    # A random moment, as a step of this generation: a time would land after the run's end
    # on a fast one, or before a slow one's first step.
    at = run.steps(gen, 0)[0] + rng.randint(2, 40)
    run.wait_for(f"generation {gen} at step {at}", lambda: max(run.steps(gen, 0), default=0) >= at)
    time.sleep(rng.uniform(0.0, 0.02))  # anywhere in the step, not only at its end
    run.injected_at.append(max(run.steps(gen, 0), default=0))
    ranks = rng.sample(range(NPROC), 2)
    if kind in ("worker-sigkill", "worker-sigterm", "worker-sigstop"):
        sig = {"worker-sigkill": signal.SIGKILL, "worker-sigterm": signal.SIGTERM}.get(kind, signal.SIGSTOP)
        _signal(run.pid(gen, ranks[0]), sig)
    elif kind == "loader-sigkill":
        pid = run.pid(gen, ranks[0])
        loaders = psutil.Process(pid).children() if pid and psutil.pid_exists(pid) else []
        if not loaders:
            raise Ended(f"rank {ranks[0]} has no DataLoader worker")
        loaders[0].kill()
    elif kind == "two-workers":
        _signal(run.pid(gen, ranks[0]), signal.SIGKILL)
        time.sleep(0.2)
        _signal(run.pid(gen, ranks[1]), signal.SIGKILL)
    elif kind == "during-restart":
        _signal(run.pid(gen, ranks[0]), signal.SIGKILL)
        run.wait_for(f"generation {gen + 1} starting", lambda: run.pid(gen + 1, ranks[1]) is not None)
        _signal(run.pid(gen + 1, ranks[1]), signal.SIGKILL)
        gen += 1
    elif kind == "forkserver-sigkill":
        servers = [p for p in psutil.Process(run.proc.pid).children() if "forkserver" in _cmdline(p)]
        if not servers:
            raise Ended("no forkserver below the launcher")
        servers[0].kill()
    elif kind == "launcher-sigkill":
        run.proc.kill()
    elif kind == "launcher-sigint":
        run.proc.send_signal(signal.SIGINT)
    run.injected.append(kind)
    return gen


def soak_one(index: int, faults: list[str], rng: random.Random, tmp_root: Path | None) -> dict:
    run = Run(index, faults, Path(tempfile.mkdtemp(prefix=f"soak-{index}-", dir=tmp_root)))
    started = time.monotonic()
    problems: list[str] = []
    try:
        run.start()
        assert run.proc is not None
        try:
            hit = -1
            for kind in faults:
                hit = inject(run, kind, rng, hit)
        except Ended as e:
            problems.append(f"fault not injected: {e}")
        except Exception as e:  # the soak's own error: this run is reported, the soak goes on
            problems.append(f"fault not injected, the soak failed: {e!r}")
        try:
            rc = run.proc.wait(max(1.0, RUN_TIMEOUT_S - (time.monotonic() - started)))
            wedged = False
        except subprocess.TimeoutExpired:
            wedged, rc = True, None
            problems.append(f"wedged: still running after {RUN_TIMEOUT_S:g} s")
        duration = time.monotonic() - started
        left = _leftovers(run, kill=wedged)
        if left:
            problems.append(f"left behind: {left}")
        expected = "exit 0, every step done"
        if faults[-1] == "launcher-sigkill":
            expected = "killed (-9)"
            if rc != -signal.SIGKILL:
                problems.append(f"exit {rc}, expected -9")
        elif faults[-1] == "launcher-sigint":
            expected = "exit 130"
            if rc != 130:
                problems.append(f"exit {rc}, expected 130")
        elif not wedged:
            if rc != 0:
                problems.append(f"exit {rc}, expected 0")
            elif run.final_step() != STEPS:
                problems.append(f"rank 0 ended at step {run.final_step()} of {STEPS}")
        redone = run.redone()
        if any(r > 1 for r in redone):
            problems.append(f"a restart redid {max(redone)} steps")
        result = {
            "run": index,
            "faults": faults,
            "injected": run.injected,
            "injected_at_step": run.injected_at,
            "exit": rc,
            "expected": expected,
            "ok": not problems,
            "wedged": wedged,
            "left_behind": len(left),
            "redone_per_restart": redone,
            "generations": len(run.generations()),
            "duration_s": round(duration, 2),
        }
        if problems:
            result["problems"] = problems
            result["log_tail"] = _tail(run.where / "stderr") + _tail(run.where / "stdout")
        return result
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        _leftovers(run, kill=True)
        shutil.rmtree(run.where, ignore_errors=True)


def _leftovers(run: Run, *, kill: bool) -> list[int]:
    """The processes ever seen below the launcher (the same pid and start time) still alive
    once they had `LEFTOVER_S` to go; with `kill`, they are SIGKILLed (a wedged run)."""
    mine = dict(run.seen)
    if kill:
        for pid, created in mine.items():
            if _create_time(pid) == created:
                _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_S
    while True:
        alive = [pid for pid, created in mine.items() if created and _is_alive(pid, created)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    return alive


def _is_alive(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: Path, lines: int = 40) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def plan(index: int, rng: random.Random, kinds: list[str] | None = None) -> list[str]:
    kinds = kinds or list(KINDS)
    first = kinds[index % len(kinds)]
    if first in ENDS_THE_RUN or rng.random() < 0.5:
        return [first]
    second = rng.choice([k for k in KINDS if KINDS[k] + KINDS[first] <= MAX_RESTARTS])
    return [first, second]


def summarise(results: list[dict]) -> dict:
    by_kind: dict[str, Counter] = {k: Counter() for k in KINDS}
    for r in results:
        for kind in set(r["faults"]):
            c = by_kind[kind]
            c["runs"] += 1
            c["ok"] += r["ok"]
            c["wedged"] += r["wedged"]
            c["left_behind"] += r["left_behind"] > 0
            c["max_redone"] = max(c["max_redone"], max(r["redone_per_restart"], default=0))
    return {
        "runs": len(results),
        "ok": sum(r["ok"] for r in results),
        "wedged": sum(r["wedged"] for r in results),
        "runs_leaving_processes": sum(r["left_behind"] > 0 for r in results),
        "max_redone_per_restart": max((max(r["redone_per_restart"], default=0) for r in results), default=0),
        "faults": sum(len(r["faults"]) for r in results),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[1])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results-soak.json")
    p.add_argument("--kinds", help=f"the first faults, in turn: a subset of {','.join(KINDS)} [default: all]")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    if kinds and set(kinds) - set(KINDS):
        p.error(f"unknown fault kind(s) {sorted(set(kinds) - set(KINDS))}")
    # A SIGTERM to the soak must still stop the run in flight (soak_one's finally).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    rng = random.Random(args.seed)
    results = []
    started = time.monotonic()
    for i in range(args.runs):
        r = soak_one(i, plan(i, rng, kinds), rng, None)
        results.append(r)
        mark = "ok" if r["ok"] else "FAILED: " + "; ".join(r["problems"])
        print(f"[soak {time.monotonic() - started:7.1f}s] run {i + 1}/{args.runs} {'+'.join(r['faults'])}: "
              f"exit {r['exit']}, redone {r['redone_per_restart']}, {r['duration_s']} s, {mark}", flush=True)  # fmt: skip
    summary = summarise(results)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.uname().nodename}, {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "settings": {
            "nproc": NPROC,
            "steps": STEPS,
            "max_restarts": MAX_RESTARTS,
            "hang_timeout_s": 3.0,
            "seed": args.seed,
            "snapshot": "every step",
            "checkpoint_every": 50,
            "kinds": kinds or list(KINDS),
        },
        "summary": summary,
        "runs": results,
        "duration_s": round(time.monotonic() - started, 1),
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{summary['ok']}/{summary['runs']} ok, {summary['wedged']} wedged, "
          f"{summary['runs_leaving_processes']} leaving processes, at most {summary['max_redone_per_restart']} "
          f"step(s) redone per restart; wrote {args.out}")  # fmt: skip
    for kind, c in summary["by_kind"].items():
        print(f"  {kind:20} {c.get('ok', 0)}/{c.get('runs', 0)} ok, max redone {c.get('max_redone', 0)}")
    return 0 if summary["ok"] == summary["runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
