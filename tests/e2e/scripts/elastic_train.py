"""A resumable gloo loop for elastic runs: STEPS all-reduces, PAUSE s apart, across whatever
world this generation has. Rank 0 saves the step after each one (OUTDIR/step), so a new
generation (a node joined or was lost) resumes where the last one was. Each rank appends
"generation world rank step pid" to OUTDIR/worlds-<host>.txt at its first step of a generation,
after an all-reduce whose sum proves that every rank of the world trained in it. Once
OUTDIR/finish exists (rank 0 looks; the all-reduce tells the others), every rank stops at
the same step, as if STEPS were reached."""

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

steps, pause_s, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
generation = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
saved = out / "step"
start = int(saved.read_text()) if saved.exists() else 0
t = torch.ones(2)
for step in range(start, steps):
    t[0], t[1] = 1.0, float(rank == 0 and (out / "finish").exists())
    dist.all_reduce(t)
    assert int(t[0].item()) == world, (t.tolist(), world)
    if t[1].item() > 0:
        break
    if step == start:
        with open(out / f"worlds-{socket.gethostname()}.txt", "a") as f:
            f.write(f"{generation} {world} {rank} {step} {os.getpid()}\n")
        print(f"generation {generation}: rank {rank} of {world} from step {step}", flush=True)
    if rank == 0:
        tmp = out / "step.tmp"
        tmp.write_text(str(step + 1))
        tmp.replace(saved)
    time.sleep(pause_s)
dist.destroy_process_group()
