"""A worker that dies leaving a zombie child: the launcher adopts it (it is the subreaper)
and must reap it. Generation 0's rank 1 starts `true`, never reaps it, writes its pid and
start time to ./orphan, and exits 1. Generation 1's rank 1 prints whether that process is
gone within 10 s (`orphan gone`, or `orphan left: <status>`)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

rank, generation = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
record = Path("orphan")


def state(pid: int, created: float) -> str:
    try:
        p = psutil.Process(pid)
        return p.status() if p.create_time() == created else "gone"
    except psutil.NoSuchProcess:
        return "gone"


if rank == 1 and generation == 0:
    child = subprocess.Popen(["true"])
    created = psutil.Process(child.pid).create_time()
    deadline = time.monotonic() + 10
    while state(child.pid, created) != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.02)
    record.write_text(f"{child.pid} {created!r}")
    os._exit(1)
if rank == 1 and generation == 1:
    pid, created = record.read_text().split()
    deadline = time.monotonic() + 10
    while (now := state(int(pid), float(created))) != "gone" and time.monotonic() < deadline:
        time.sleep(0.05)
    print("orphan gone" if now == "gone" else f"orphan left: {now}", flush=True)
sys.exit(0)
