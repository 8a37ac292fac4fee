"""A tiny DDP loop whose every figure the launcher shows can be checked: it steps an
optimizer, reports step, loss and samples, and resumes its global step from a checkpoint
(rank 0 saves every 10 steps), so a restart continues where the last save left off.

usage: agreement_train.py STEPS PAUSE_S CHECKPOINT
"""

import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import ddp_launch
from ddp_launch import checkpoint

BATCH = 8
total_steps, pause_s, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
step = 0
state = checkpoint.load(path)
if state is not None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = state["step"]
    print(f"rank {rank} resuming at step {step}", flush=True)
ddp_model = DistributedDataParallel(model)
data = torch.Generator().manual_seed(1000 * rank + step)
while step < total_steps:
    optimizer.zero_grad()
    loss = ddp_model(torch.randn(BATCH, 4, generator=data)).pow(2).mean()
    loss.backward()
    optimizer.step()
    step += 1
    ddp_launch.report(step=step, loss=loss.item(), samples=step * BATCH * world_size, total_steps=total_steps)
    if rank == 0 and step % 10 == 0:
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, path)
    time.sleep(pause_s)
dist.destroy_process_group()
