"""An unmodified training loop: no ddp_launch import, no DDP; the launcher counts optimizer steps."""

import sys
import time

import torch

steps = int(sys.argv[1])
pause_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(steps):
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    time.sleep(pause_s)
