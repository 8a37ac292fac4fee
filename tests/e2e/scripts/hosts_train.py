"""A tiny gloo training loop across hosts: STEPS all-reduces, PAUSE s apart; each rank writes
its host name, the world it saw, MASTER_ADDR and GLOO_SOCKET_IFNAME to OUTDIR/rank-<r>.txt.
An optional RANK:STEP makes that rank exit 3 at that step."""

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

steps, pause_s, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
# "RANK:STEP": that rank exits 3 at that step (its peers then fail in their next all-reduce)
crash_rank, crash_step = (int(x) for x in sys.argv[4].split(":")) if len(sys.argv) > 4 else (-1, -1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.ones(4)
for step in range(steps):
    if rank == crash_rank and step == crash_step:
        print(f"rank {rank} crashes at step {step}", flush=True)
        os._exit(3)
    dist.all_reduce(t)
    t.fill_(1.0)
    if step == 0:
        ifname = os.environ.get("GLOO_SOCKET_IFNAME", "-")
        (out / f"rank-{rank}.txt").write_text(f"{socket.gethostname()} {world} {os.environ['MASTER_ADDR']} {ifname}\n")
        print("training", flush=True)
    time.sleep(pause_s)
dist.destroy_process_group()
