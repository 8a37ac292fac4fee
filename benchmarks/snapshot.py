"""python -m benchmarks.snapshot [--pairs 5] [--nproc 2,4] [--out FILE.json]

What in-memory snapshots (ddp_launch.checkpoint.snapshot, called after every step) cost: the
example (examples/train_mlp.py, through benchmarks/workload.py's timing marks) under
ddp-launch with ``--checkpoint``, in three modes run one after the other (each one first in
turn): ``--no-snapshot``; the default budget (snapshots take at most 3% of the loop, so they
may be spaced every 2nd, 4th, ... step; the spacing reached is reported); and
``--snapshot-budget 0``, a snapshot of every step. Throughput is rank 0's steps/s over steps
20..20+M, as in the main benchmark; the figures are the medians of the per-run ratios to
``--no-snapshot`` (target >= 0.97).

Then, in this process, what one snapshot of a 100M-parameter model costs on CPU: the call,
which is the copy of the tensors into a slot in /dev/shm, first (the slot reserved and
mapped) and steady.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.procs import DDP_LAUNCH, base_env, launcher_command, run_launcher

HERE = Path(__file__).resolve().parent
WINDOW_FROM, WINDOW_STEPS = 20, 1000


MODES = {  # what the example is given: no snapshot; the default budget; every step
    "off": ["--no-snapshot"],
    "budget": [],
    "every": ["--snapshot-budget", "0"],
}
_SPACING = re.compile(r"snapshots: \d+ taken, \d+ passed over by the budget, every (\d+) step")


def one_run(nproc: int, mode: str, tmp_root: Path | None) -> tuple[float | None, int | None]:
    """Rank 0's steps/s over the window, and the budget's spacing at the end (in steps)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=tmp_root))
    try:
        marks = tmp / "marks"
        marks.mkdir()
        steps = WINDOW_FROM + WINDOW_STEPS + 2
        args = ["--max-steps", str(steps), "--epochs", "1000", "--checkpoint", str(tmp / "ckpt.pt"),
                "--checkpoint-every", "0", *MODES[mode]]  # fmt: skip
        env = {"BENCH_DIR": str(marks), "TMPDIR": str(tmp), "BENCH_WINDOW_FROM": str(WINDOW_FROM),
               "BENCH_WINDOW_TO": str(WINDOW_FROM + WINDOW_STEPS)}  # fmt: skip
        cmd = launcher_command(DDP_LAUNCH, nproc, args, run_dir=tmp / "run")
        outcome = run_launcher(DDP_LAUNCH, cmd, env=base_env(env), workdir=tmp, marks_dir=marks, timeout_s=300)
        window = outcome.marks.get("window-gen0-rank0")
        if outcome.exit_code != 0 or not window or len(window) < 2:
            return None, None
        spacing = _SPACING.search(outcome.log_tail)
        return WINDOW_STEPS / (window[1] - window[0]), int(spacing.group(1)) if spacing else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def big_model_cost(params: int = 100_000_000, repeats: int = 3) -> dict:
    """One snapshot of `params` float32 parameters (a single 100M model's state, no
    optimizer state) on CPU: the call is the whole cost (the copy into the slot). The first
    call into each of the two slots also reserves and maps it; the steady cost is the median
    of `repeats` calls after those."""
    import torch

    from ddp_launch import snapshots

    where = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        state = {"model": {f"layer{i}": torch.randn(params // 10) for i in range(10)}}
        taker = snapshots.Snapshotter(where, rank=0, local_rank=0, world_size=1)
        calls = []
        for step in range(2 + repeats):
            t0 = time.perf_counter()
            taker.take(state, step)
            taker.wait()  # CPU: nothing in flight; kept so the figure is the whole cost anyway
            calls.append(time.perf_counter() - t0)
        return {
            "params": params,
            "bytes": params * 4,
            "first_call_s": round(calls[0], 4),
            "call_s": round(statistics.median(calls[2:]), 4),
        }
    finally:
        shutil.rmtree(where, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.snapshot", description=__doc__.split("\n\n")[1])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--nproc", default="2,4")
    p.add_argument("--out", type=Path, default=HERE / "results-snapshot.json")
    p.add_argument("--no-big", action="store_true", help="skip the 100M-parameter measurement")
    args = p.parse_args(argv)
    result: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    for n in (int(x) for x in args.nproc.split(",")):
        rows = []
        for pair in range(args.pairs):
            order = list(MODES)[pair % 3 :] + list(MODES)[: pair % 3]  # each mode first in turn
            got = {mode: one_run(n, mode, None) for mode in order}
            rows.append({mode: got[mode][0] for mode in MODES} | {"budget_every": got["budget"][1]})
            print(f"N={n} run {pair + 1}/{args.pairs}: " + ", ".join(f"{m} {got[m][0]}" for m in MODES)
                  + f" steps/s; the budget kept every {got['budget'][1]} step(s)", flush=True)  # fmt: skip
        result[f"n{n}"] = {"runs": rows}
        for mode in ("budget", "every"):
            ratios = [r[mode] / r["off"] for r in rows if r[mode] and r["off"]]
            result[f"n{n}"][f"{mode}_ratio_median"] = round(statistics.median(ratios), 4) if ratios else None
            result[f"n{n}"][f"{mode}_ratios"] = [round(x, 4) for x in ratios]
        print(f"N={n}: throughput against no snapshot, median: default budget "
              f"{result[f'n{n}']['budget_ratio_median']}, every step {result[f'n{n}']['every_ratio_median']}")  # fmt: skip
    if not args.no_big:
        result["big_model"] = big_model_cost()
        print(f"100M parameters: {result['big_model']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
