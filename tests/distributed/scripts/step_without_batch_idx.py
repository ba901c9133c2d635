"""Fit and validate a module whose steps take no batch_idx (``training_step(self, batch)``, as in
Lightning's FSDP guide) and write rank 0's logged losses."""

import argparse
import csv
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import TrainModule, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--strategy", default="single")
parser.add_argument("--batch-size", type=int, default=16)
args = parser.parse_args()


class Regression(TrainModule):
    def configure_model(self):
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)  # over every rank's batches

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=args.strategy,
    max_steps=4,
    log_every_n_steps=1,
    seed=7,
    default_root_dir=args.out,
    enable_progress_bar=False,
)
module = Regression()
trainer.fit(module, DataLoader(data, batch_size=args.batch_size, shuffle=True))
(metrics,) = trainer.validate(module, DataLoader(data, batch_size=args.batch_size))
if trainer.is_global_zero:
    rows = list(csv.DictReader(open(Path(args.out) / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    result = {"losses": losses, "val_loss": metrics["val_loss"], "world_size": trainer.world_size}
    (Path(args.out) / "result.json").write_text(json.dumps(result))
