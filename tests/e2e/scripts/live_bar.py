"""A tqdm-like bar on stdout and a prompt on stderr, each left unfinished until the test says.

The bar's states end in a carriage return, the prompt in nothing; each waits for a file in
OUTDIR (written by the test once it has seen it on the launcher's console) before its line
is finished, so the test can tell that the unfinished line was shown, not printed at the end.
"""

import os
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
rank = os.environ["RANK"]


def wait_for(name: str) -> None:
    deadline = time.monotonic() + 100  # longer than the test waits: a late line fails it
    while not (out / name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


for i in range(0, 101, 25):
    print(f"rank {rank} epoch 1 {i:3d}%|{'#' * (i // 10):<10}|", end="\r", flush=True)
    time.sleep(0.1)
wait_for(f"bar-seen-{rank}")
print()
sys.stderr.write(f"rank {rank} (Pdb) ")
sys.stderr.flush()
wait_for(f"prompt-seen-{rank}")
sys.stderr.write("continue\n")
print(f"rank {rank} done")
