"""A tiny stand-in for a project's training script, as torchrun users write them: no
`if __name__ == "__main__":` guard, a DataLoader with workers over a dataset that holds a
lambda, a multiprocessing.Pool whose children read a `__main__` global, one all-reduce.
Each rank writes what it saw to $CORPUS_OUT/rank<RANK>.json."""

import json
import multiprocessing
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


class Squares(Dataset):
    def __init__(self):
        self.transform = lambda x: x * x  # cannot be pickled: fine with fork, fatal with forkserver

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor(self.transform(i))


def read_global(i):
    return i + OFFSET


OFFSET = 100  # set after read_global was defined: Pool children see it only if forked

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
loaded = sorted(int(x) for batch in DataLoader(Squares(), batch_size=2, num_workers=2) for x in batch)
with multiprocessing.Pool(2) as pool:
    pooled = pool.map(read_global, range(3))
dist.destroy_process_group()
record = {
    "argv": sys.argv if not os.path.isabs(sys.argv[0]) else [os.path.basename(sys.argv[0]), *sys.argv[1:]],
    "rank": rank,
    "world_size": world,
    "local_rank": os.environ["LOCAL_RANK"],
    "local_world_size": os.environ["LOCAL_WORLD_SIZE"],
    "role": os.environ["ROLE_NAME"],
    "all_reduce": total.item(),
    "loaded": loaded,
    "pooled": pooled,
}
with open(os.path.join(os.environ["CORPUS_OUT"], f"rank{rank}.json"), "w") as f:
    json.dump(record, f, sort_keys=True)
print(f"rank {rank} of {world} done")
