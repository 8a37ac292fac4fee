"""Writes the torchrun contract variables this worker sees, and its argv, to OUTDIR/env-<RANK>.json."""

import json
import os
import sys
from pathlib import Path

NAMES = [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS",
    "DDP_LAUNCH_BACKEND", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "DDP_LAUNCH_MASTER",
    "DDP_LAUNCH_HEARTBEAT_RELAY",
]  # fmt: skip

out = Path(sys.argv[1])
import torch  # noqa: E402

seen = {name: os.environ.get(name) for name in NAMES}
seen["argv"] = sys.argv
seen["name"] = __name__
seen["torch_threads"] = torch.get_num_threads()
seen["pid"] = os.getpid()
(out / f"env-{os.environ['RANK']}.json").write_text(json.dumps(seen))
print(f"hello from rank {os.environ['RANK']}")
print(f"to stderr from rank {os.environ['RANK']}", file=sys.stderr)
