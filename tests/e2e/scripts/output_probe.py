"""Prints a known set of lines on stdout and stderr, a \r bar among them; PROBE_FAIL_LOCAL_RANK
fails in generation 0, after printing, through torch's @record."""

import os
import sys

rank = os.environ["LOCAL_RANK"]
gen = os.environ["TORCHELASTIC_RESTART_COUNT"]
print(f"out {rank} hello gen {gen}")
print(f"err {rank} oops gen {gen}", file=sys.stderr)
for i in range(3):
    print(f"\rbar {rank} {i}", end="", flush=True)
print()
print(f"out {rank} KEEP me")
print(f"err {rank} KEEP err", file=sys.stderr)
print(f"out {rank} caf\u00e9 done")
if os.environ.get("PROBE_FAIL_LOCAL_RANK") == rank and gen == "0":
    from torch.distributed.elastic.multiprocessing.errors import record

    @record  # torch writes the failure to TORCHELASTIC_ERROR_FILE: error.json in the tree
    def fail():
        raise RuntimeError("probe failure")

    fail()
