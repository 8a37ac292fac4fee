"""Each rank starts a grandchild, records its pids in OUTDIR, prints 'ready', then sleeps."""

import os
import subprocess
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
rank = os.environ["RANK"]
(out / f"pids-{rank}.txt").write_text(f"{os.getpid()} {child.pid}\n")
print(f"rank {rank} ready", flush=True)
try:
    time.sleep(120)
except KeyboardInterrupt:  # a Ctrl-C reaches the script, which may save and leave
    print(f"rank {rank} got KeyboardInterrupt", flush=True)
    raise
