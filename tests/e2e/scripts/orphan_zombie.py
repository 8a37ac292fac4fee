"""A worker that dies leaving a zombie child and a live one: the launcher adopts both (it is
the subreaper), must reap the first and stop the second with the generation (torchrun
signals a dead worker's process group too). Generation 0's rank 1 starts `true`, never reaps
it, starts `sleep 60` (in its own process group, which it leads), writes their pids and start times to
./orphan, and exits 1. Generation 1's rank 1 prints whether the sleeper is gone as it starts
(`sleeper gone at the restart`, or `sleeper left: <status>`) and whether the zombie is gone
within 10 s (`orphan gone`, or `orphan left: <status>`)."""

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
    sleeper = subprocess.Popen(["sleep", "60"])
    record.write_text(f"{child.pid} {created!r} {sleeper.pid} {psutil.Process(sleeper.pid).create_time()!r}")
    os._exit(1)
if rank == 1 and generation == 1:
    pid, created, sleeper_pid, sleeper_created = record.read_text().split()
    now = state(int(sleeper_pid), float(sleeper_created))
    print("sleeper gone at the restart" if now == "gone" else f"sleeper left: {now}", flush=True)
    deadline = time.monotonic() + 10
    while (now := state(int(pid), float(created))) != "gone" and time.monotonic() < deadline:
        time.sleep(0.05)
    print("orphan gone" if now == "gone" else f"orphan left: {now}", flush=True)
sys.exit(0)
