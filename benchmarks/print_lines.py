"""The output figure's script: prints BENCH_LINES lines (default 200,000) as fast as it can.

No torch and no process group: what is timed is how fast the launcher takes a worker's
output. The lines look like a training log's. When the last line is out (and flushed), it
writes the mark ``print-gen<G>-rank<R>`` into ``$BENCH_DIR``: ``time.time()`` before the
first print and after the flush, and the same two moments of ``time.perf_counter()``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

LINES = int(os.environ.get("BENCH_LINES", "200000"))
RANK = int(os.environ.get("RANK", "0"))
GENERATION = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def main() -> None:
    started, t0 = time.time(), time.perf_counter()
    for i in range(LINES):
        print(f"rank {RANK} step {i} loss {1.0 / (i + 1):.6f} lr 0.001")
    sys.stdout.flush()
    ended, t1 = time.time(), time.perf_counter()
    bench_dir = os.environ.get("BENCH_DIR")
    if bench_dir:
        name = f"print-gen{GENERATION}-rank{RANK}"
        tmp = Path(bench_dir) / f".{name}.tmp"
        tmp.write_text(f"{started!r}\n{ended!r}\n{t0!r}\n{t1!r}\n")
        os.replace(tmp, Path(bench_dir) / name)


if __name__ == "__main__":
    main()
