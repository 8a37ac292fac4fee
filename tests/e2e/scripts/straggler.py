"""A loop in which rank SLOW_RANK sleeps longer every step than the others: a straggler.
The peers do not wait for it (no collective), so their rates stay high."""

import os
import sys
import time

import torch

slow_rank, steps = int(sys.argv[1]), int(sys.argv[2])
pause_s = 0.12 if int(os.environ["RANK"]) == slow_rank else 0.02
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(steps):
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    time.sleep(pause_s)
