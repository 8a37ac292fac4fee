"""The soak's training script: examples/train_mlp.py, with a record of every rank's steps.

Each rank appends to ``$SOAK_DIR/steps-gen<G>-rank<R>`` (G = TORCHELASTIC_RESTART_COUNT):
first ``pid <pid>`` as soon as it starts (before ``init_process_group``, so that a fault can
be aimed at a generation that is still starting), then the example's global step after each
optimizer step, one line each, flushed. From these the soak knows which process is which
rank, and how many steps each restart redid: the last step of a generation against the
first step of the next one. The example itself is unchanged; it runs as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import ddp_launch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py"


def main() -> None:
    where = Path(os.environ["SOAK_DIR"])
    name = f"steps-gen{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-rank{os.environ.get('RANK', '0')}"
    record = open(where / name, "a", buffering=1)  # line-buffered: each line reaches the file
    record.write(f"pid {os.getpid()}\n")
    real_report = ddp_launch.report

    def report(**metrics: float) -> None:
        if "step" in metrics:
            record.write(f"{int(metrics['step'])}\n")
        real_report(**metrics)

    ddp_launch.report = report  # the example's `from ddp_launch import report` takes this one
    sys.argv = [str(EXAMPLE), *sys.argv[1:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


if __name__ == "__main__":
    main()
