"""Each rank records its pid in OUTDIR, prints 'ready', then sleeps; a Ctrl-C makes it save
for a moment and leave.

The pid file is written inside the `try`: once it exists, a Ctrl-C is one the script
handles. The save takes SAVE_S seconds, as a checkpoint would; a second interrupt during it
would cut it short, and the file `saved-<rank>` in OUTDIR would be missing.
"""

import os
import sys
import time
from pathlib import Path

SAVE_S = 1.5

out = Path(sys.argv[1])
rank = os.environ["RANK"]
try:
    (out / f"pids-{rank}.txt").write_text(f"{os.getpid()}\n")
    print(f"rank {rank} ready", flush=True)
    time.sleep(120)
except KeyboardInterrupt:
    print(f"rank {rank} got KeyboardInterrupt, saving", flush=True)
    time.sleep(SAVE_S)
    (out / f"saved-{rank}").write_text("saved\n")
    print(f"rank {rank} saved", flush=True)
    raise
