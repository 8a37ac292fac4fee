"""python -m benchmarks.snapshot [--pairs 5] [--nproc 2,4] [--out FILE.json]

What an in-memory snapshot after every step (ddp_launch.checkpoint.snapshot) costs: the
example (examples/train_mlp.py, through benchmarks/workload.py's timing marks) under
ddp-launch with ``--checkpoint`` and snapshots, and the same run with ``--no-snapshot``, in
alternating pairs. Throughput is rank 0's steps/s over steps 20..20+M, as in the main
benchmark; the figure is the median of the per-pair ratios with/without (target >= 0.97).

Then, in this process, what one snapshot of a 100M-parameter model costs on CPU: the call,
which is the copy of the tensors into a slot in /dev/shm, first (the slot reserved and
mapped) and steady.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.procs import DDP_LAUNCH, base_env, launcher_command, run_launcher

HERE = Path(__file__).resolve().parent
WINDOW_FROM, WINDOW_STEPS = 20, 1000


def one_run(nproc: int, snapshot: bool, tmp_root: Path | None) -> float | None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=tmp_root))
    try:
        marks = tmp / "marks"
        marks.mkdir()
        steps = WINDOW_FROM + WINDOW_STEPS + 2
        args = ["--max-steps", str(steps), "--epochs", "1000", "--checkpoint", str(tmp / "ckpt.pt"),
                "--checkpoint-every", "0"] + ([] if snapshot else ["--no-snapshot"])  # fmt: skip
        env = {"BENCH_DIR": str(marks), "TMPDIR": str(tmp), "BENCH_WINDOW_FROM": str(WINDOW_FROM),
               "BENCH_WINDOW_TO": str(WINDOW_FROM + WINDOW_STEPS)}  # fmt: skip
        cmd = launcher_command(DDP_LAUNCH, nproc, args, run_dir=tmp / "run")
        outcome = run_launcher(DDP_LAUNCH, cmd, env=base_env(env), workdir=tmp, marks_dir=marks, timeout_s=300)
        window = outcome.marks.get("window-gen0-rank0")
        if outcome.exit_code != 0 or not window or len(window) < 2:
            return None
        return WINDOW_STEPS / (window[1] - window[0])
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
            order = (False, True) if pair % 2 == 0 else (True, False)
            got = {snap: one_run(n, snap, None) for snap in order}
            rows.append({"without": got[False], "with": got[True]})
            print(f"N={n} pair {pair + 1}/{args.pairs}: without {got[False]}, with {got[True]} steps/s", flush=True)
        ratios = [r["with"] / r["without"] for r in rows if r["with"] and r["without"]]
        result[f"n{n}"] = {
            "pairs": rows,
            "ratio_median": round(statistics.median(ratios), 4) if ratios else None,
            "ratios": [round(x, 4) for x in ratios],
        }
        print(f"N={n}: throughput with snapshots / without, median of pairs: {result[f'n{n}']['ratio_median']}")
    if not args.no_big:
        result["big_model"] = big_model_cost()
        print(f"100M parameters: {result['big_model']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
