"""The training script both launchers run: examples/train_mlp.py, with timing marks.

It installs a global optimizer step post hook, then runs the example as ``__main__`` with
this script's arguments. Nothing in the example changes, so what is measured is a plain
torchrun script. The hook writes ``time.time()`` marks, one small file each, into the
directory named by ``BENCH_DIR`` (nothing is written without it):

``first-step-gen<G>-rank<R>``
    when rank R completed its first optimizer step in generation G
    (G = TORCHELASTIC_RESTART_COUNT, which both launchers set).
``window-gen<G>-rank0``
    when rank 0 completed step BENCH_WINDOW_FROM and step BENCH_WINDOW_TO (throughput over
    the steady part of training), then rank 0's CPU time (all its threads) at both steps.
``fault-gen0-rank<R>``
    when rank BENCH_FAULT_RANK, at step BENCH_FAULT_STEP of generation 0, is about to
    exit 1 (``BENCH_FAULT=exit``) or starts sleeping forever (``BENCH_FAULT=hang``).
    Later generations run clean.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py"

BENCH_DIR = os.environ.get("BENCH_DIR")
RANK = int(os.environ.get("RANK", "0"))
GENERATION = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
WINDOW_FROM = int(os.environ.get("BENCH_WINDOW_FROM", "0"))
WINDOW_TO = int(os.environ.get("BENCH_WINDOW_TO", "0"))
FAULT = os.environ.get("BENCH_FAULT", "")
FAULT_RANK = int(os.environ.get("BENCH_FAULT_RANK", "-1"))
FAULT_ARMED = FAULT in ("exit", "hang") and GENERATION == 0 and FAULT_RANK == RANK
FAULT_STEP = int(os.environ.get("BENCH_FAULT_STEP", "0"))

_steps = 0
_window: list[float] = []
_window_cpu: list[float] = []


def _mark(name: str, *times: float) -> None:
    """Write the file in one piece (rename), so a reader never sees half of it."""
    if not BENCH_DIR:
        return
    path = Path(BENCH_DIR) / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text("".join(f"{t!r}\n" for t in times))
    os.replace(tmp, path)


def _after_step(optimizer: object, args: object, kwargs: object) -> None:
    global _steps
    now = time.time()
    _steps += 1
    if _steps == 1:
        _mark(f"first-step-gen{GENERATION}-rank{RANK}", now)
    if RANK == 0 and _steps in (WINDOW_FROM, WINDOW_TO) and WINDOW_TO > WINDOW_FROM > 0:
        _window.append(now)
        _window_cpu.append(time.process_time())
        if _steps == WINDOW_TO:
            _mark(f"window-gen{GENERATION}-rank0", *_window, *_window_cpu)
    if FAULT_ARMED and _steps == FAULT_STEP:
        sys.stdout.flush()
        _mark(f"fault-gen0-rank{RANK}", time.time())
        if FAULT == "exit":
            os._exit(1)
        while True:  # "hang": the training thread stops here; its peers block in allreduce
            time.sleep(1)


def main() -> None:
    import runpy

    register_optimizer_step_post_hook(_after_step)
    sys.argv = [str(EXAMPLE), *sys.argv[1:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


if __name__ == "__main__":
    main()
