"""Records the backend ddp-launch chose and the CUDA device each rank landed on, then does
one all-reduce on that device (a real NCCL collective when the backend is nccl)."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

backend = os.environ["DDP_LAUNCH_BACKEND"]
dist.init_process_group(backend)
local_rank = int(os.environ["LOCAL_RANK"])
device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
t = torch.ones(1, device=device) * (dist.get_rank() + 1)
dist.all_reduce(t)
seen = {
    "backend": backend,
    "dist_backend": dist.get_backend(),
    "local_rank": local_rank,
    "current_device": torch.cuda.current_device() if torch.cuda.is_available() else None,
    "tensor_device": str(t.device),
    "sum": t.item(),
}
Path(sys.argv[1], f"cuda-{os.environ['RANK']}.json").write_text(json.dumps(seen))
dist.destroy_process_group()
