"""Runs examples/train_mlp.py with one fault injected on the first attempt (generation 0).

usage: faults.py FAULT RANK STEP [example args...]
  exit1      rank RANK exits 1 right after optimizer step STEP
  sigkill    rank RANK kills itself with SIGKILL after step STEP
  raise      rank RANK raises RuntimeError after step STEP
  hang       rank RANK sleeps forever after step STEP (its peers then block in allreduce)
  sigstop    rank RANK stops itself (SIGSTOP) after step STEP
  hold-gil   rank RANK holds the GIL forever before its first step (heartbeats stop too)
  save-crash rank RANK dies (os._exit) in the middle of the checkpoint save after step STEP
  snapshot-crash  rank RANK dies (os._exit) in the middle of its snapshot after step STEP, with
             the first tensor of the state copied and the rest not
The fault only fires when TORCHELASTIC_RESTART_COUNT is 0, so a restart runs clean.
"""

import ctypes
import os
import runpy
import signal
import sys
import time
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

fault, fault_rank, fault_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
example = Path(__file__).resolve().parents[3] / "examples" / "train_mlp.py"
armed = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and int(os.environ["RANK"]) == fault_rank
steps = 0


def wait_forever_in_the_hook():
    while True:
        time.sleep(1)


def after_step(optimizer, args, kwargs):
    global steps
    steps += 1
    if not armed or steps != fault_step:
        return
    print(f"injecting {fault} at step {steps}", flush=True)
    if fault == "exit1":
        os._exit(1)
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "raise":
        raise RuntimeError(f"injected failure at step {steps}")
    if fault == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if fault == "hang":
        wait_forever_in_the_hook()
    if fault == "save-crash":
        import torch

        def save_half_then_die(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os._exit(1)

        # The example saves right after this step: that save dies half-way through.
        torch.save = save_half_then_die
    if fault == "snapshot-crash":
        from ddp_launch import snapshots

        real_views = snapshots._Slot.views

        class DieOnCopy:
            def copy_(self, src):
                os._exit(1)

        # The example snapshots right after this step: that one is torn after its first tensor.
        snapshots._Slot.views = lambda self, *a: [real_views(self, *a)[0], DieOnCopy()]


if armed and fault == "hold-gil":
    print("holding the GIL forever", flush=True)
    ctypes.PyDLL(None).sleep(3600)  # a C call that keeps the GIL: not even heartbeats run

register_optimizer_step_post_hook(after_step)
sys.argv = [str(example), *sys.argv[4:]]
runpy.run_path(str(example), run_name="__main__")
