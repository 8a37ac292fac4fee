"""Hugging Face Accelerate reads the torchrun variables to find its place in the world."""

import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator

acc = Accelerator(cpu=True)
seen = {
    "num_processes": acc.num_processes,
    "process_index": acc.process_index,
    "distributed": str(acc.distributed_type),
}
Path(sys.argv[1], f"accelerate-{os.environ['RANK']}.json").write_text(json.dumps(seen))
acc.end_training()
