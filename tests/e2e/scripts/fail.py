"""Rank RANK_TO_FAIL ends badly in one of several ways; the others wait (in a sleep) to be stopped.

usage: fail.py RANK_TO_FAIL HOW [ARG]
  HOW = exit CODE | signal NAME | raise | ok
"""

import os
import signal
import sys
import time

rank = int(os.environ["RANK"])
target, how = int(sys.argv[1]), sys.argv[2]
print(f"rank {rank} up")
if rank == target:
    time.sleep(0.2)
    if how == "exit":
        print(f"rank {rank} exits with {sys.argv[3]}", flush=True)
        sys.exit(int(sys.argv[3]))
    if how == "signal":
        os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    if how == "raise":

        def load_batch(i):
            raise ValueError(f"bad batch {i}")

        load_batch(7)
    sys.exit(0)
time.sleep(60)
