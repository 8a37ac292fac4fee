"""python -m benchmarks [--quick] [--out FILE.json] [--figures startup,recovery,...]

Runs ddp-launch and torchrun side by side on the same script, in alternating pairs, prints
a table and writes every value, pair by pair, to a JSON file. See benchmarks/README.md.
``--figures soak`` runs the fault soak instead (benchmarks/soak.py: 200 runs, about half an
hour, never part of the default set).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import control_plane, figures, report, soak

FIGURES = ("startup", "throughput", "overhead", "recovery", "hang", "output", "control")
HERE = Path(__file__).resolve().parent
_ORDER = ("startup", "throughput", "step_cpu", "overhead", "wall", "recovery", "hang", "output", "control")


def settings_for(args: argparse.Namespace, tmp_root: Path) -> tuple[figures.Settings, dict]:
    quick = args.quick
    nprocs = tuple(int(x) for x in args.nproc.split(",")) if args.nproc else ((2,) if quick else (4, 2))
    settings = figures.Settings(
        pairs=args.pairs or (1 if quick else 5),
        train_nprocs=nprocs,
        fault_nproc=max(nprocs),
        window_from=20,
        window_steps=40 if quick else 1000,  # ~9 s at N=2: per-run noise here is +-10%
        fault_rank=1,
        fault_step=5 if quick else 30,
        hang_timeout_s=3.0 if quick else 10.0,
        torchrun_hang_bound_s=5.0 if quick else 60.0,
        run_timeout_s=90.0 if quick else 180.0,
        stop_early=quick,
        tmp_root=tmp_root,
        output_lines=20_000 if quick else 200_000,
    )
    control = {
        "workers": args.control_workers or (256 if quick else 1024),
        "rates": (1.0, 10.0),
        "relayed_rates": (10.0,),
        "warmup_s": 0.5 if quick else 2.0,
        "duration_s": 2.0 if quick else 10.0,
        "load_procs": 2 if quick else 4,
    }
    return settings, control


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: 1 pair, N=2, a tiny workload, --hang-timeout 3, fault runs ended once recovered, "
        "20,000 printed lines per rank, 256 simulated workers for 2 s",
    )
    p.add_argument("--out", type=Path, help="JSON file [default: benchmarks/results.json, or results-quick.json]")
    p.add_argument("--figures", default=",".join(FIGURES), help=f"a subset of {','.join(FIGURES)}")
    p.add_argument("--pairs", type=int, help="alternating pairs per figure [default: 5, --quick 1]")
    p.add_argument("--nproc", help="world sizes of the train runs, e.g. 2 or 4,2 [default: 4,2; --quick 2]; "
                   "recovery and hang use the largest")  # fmt: skip
    p.add_argument("--control-workers", type=int, help="simulated workers [default: 1024, --quick 256]")
    p.add_argument(
        "--show",
        type=Path,
        metavar="FILE.json",
        help="run nothing: print the table of an earlier run, and its markdown (for the README)",
    )
    args = p.parse_args(argv)
    wanted = {f.strip() for f in args.figures.split(",") if f.strip()}
    unknown = wanted - set(FIGURES) - {"soak"}
    if unknown:
        p.error(f"unknown figure(s) {sorted(unknown)}; choose from {','.join(FIGURES)} (or soak)")
    if "soak" in wanted and len(wanted) > 1:
        p.error("--figures soak runs alone (about half an hour)")
    if args.pairs is not None and args.pairs < 1:
        p.error("--pairs must be >= 1")
    args.wanted = wanted
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.show:
        result = json.loads(args.show.read_text())
        print(report.terminal_table(result))
        print()
        print(report.markdown_tables(result))
        return 0
    if "soak" in args.wanted:
        return soak.main([] if args.out is None else ["--out", str(args.out)])
    out = args.out or HERE / ("results-quick.json" if args.quick else "results.json")
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    tmp_root = Path(tempfile.mkdtemp(prefix="ddp-launch-bench-"))
    try:
        settings, control = settings_for(args, tmp_root)
        result = {
            "suite": "ddp-launch benchmarks",
            "schema": 1,
            "date": report.now_iso(),
            "machine": report.machine(),
            "commit": report.commit(),
            "settings": {
                "quick": args.quick,
                "figures": sorted(args.wanted, key=FIGURES.index),
                **{k: v for k, v in vars(settings).items() if k != "tmp_root"},
                "control_plane": control,
                "order": "pair i: ddp-launch first when i is even, torchrun first when odd",
            },
        }
        records: list[dict] = []
        found: list[dict] = []
        for fig in figures.train_figures(settings, args.wanted, records, say):
            found.append(fig.to_json() | {"key": fig.key})
        if "recovery" in args.wanted:
            fig = figures.recovery_figure(settings, records, say)
            found.append(fig.to_json() | {"key": fig.key})
        if "hang" in args.wanted:
            fig = figures.hang_figure(settings, records, say)
            found.append(fig.to_json() | {"key": fig.key})
        if "output" in args.wanted:
            found += [fig.to_json() | {"key": fig.key} for fig in figures.output_figures(settings, records, say)]
        if "control" in args.wanted:
            found += control_plane.control_plane_figures(say=say, **control)
        found.sort(key=lambda f: _ORDER.index(next(p for p in _ORDER if f["key"].startswith(p))))
        result["figures"] = {f.pop("key"): f for f in found}
        result["runs"] = records
        result["duration_s"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(report.terminal_table(result))
    print(f"\n{result['duration_s']:.0f} s; every value, pair by pair: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
