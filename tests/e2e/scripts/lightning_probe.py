"""A plain PyTorch Lightning script: Lightning must see a torchrun-style launch and not
start processes of its own."""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
world = int(os.environ["WORLD_SIZE"])
trainer = L.Trainer(
    accelerator="cpu", devices=world, strategy="ddp", max_steps=4, logger=False,
    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
)  # fmt: skip
trainer.fit(Tiny(), DataLoader(data, batch_size=8))
seen = {
    "cluster": type(trainer.strategy.cluster_environment).__name__,
    "global_rank": trainer.global_rank,
    "world_size": trainer.world_size,
    "pid": os.getpid(),
    "step": trainer.global_step,
}
Path(sys.argv[1], f"lightning-{os.environ['RANK']}.json").write_text(json.dumps(seen))
