"""Shows whether a generation's workers were forked ahead, as standbys.

Each rank prints `gen G rank R pid P` and the standbys it can see beside it (children of the
forkserver, its parent, named ``standby<local rank>``). In generation 0 rank 1 waits (up to
20 s) for the next generation's standbys, prints their pids, then exits 1; with
``--want-none`` it waits 2 s and prints those it sees (none expected). The last generation
(TORCHELASTIC_RESTART_COUNT == LAST) waits for its own standbys when ``--wait-in-last`` says
so, then exits 0.
"""

import argparse
import os
import time

import psutil

p = argparse.ArgumentParser()
p.add_argument("--last", type=int, default=1)
p.add_argument("--want-none", action="store_true")
p.add_argument("--wait-in-last", action="store_true")
args = p.parse_args()
generation = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank, nproc = int(os.environ["RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])


def standbys() -> list[int]:
    return sorted(c.pid for c in psutil.Process(os.getppid()).children() if c.name().startswith("standby"))


def wait_for(count: int, timeout_s: float) -> list[int]:
    end = time.monotonic() + timeout_s
    while len(standbys()) < count and time.monotonic() < end:
        time.sleep(0.05)
    return standbys()


print(f"gen {generation} rank {rank} pid {os.getpid()}", flush=True)
if rank == 1 and (generation < args.last or args.wait_in_last):
    seen = wait_for(0 if args.want_none else nproc, 2.0 if args.want_none else 20.0)
    print(f"gen {generation} standbys {' '.join(map(str, seen)) or 'none'}", flush=True)
if rank == 1 and generation < args.last:
    os._exit(1)
