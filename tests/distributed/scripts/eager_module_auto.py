"""Fit, with the default ``strategy`` ("auto"), a module whose layers are built in ``__init__`` (Lightning's
common style, nothing in ``configure_model``) that also overrides Lightning's ``prepare_data``, ``setup`` and
``optimizer_step`` (a warm-up); write rank 0's logged losses, lrs, and the chosen strategy."""

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
parser.add_argument("--batch-size", type=int, default=16)
args = parser.parse_args()


class EagerRegression(TrainModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lrs = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def prepare_data(self):  # once per node, before setup: every rank then sees the file
        with open(Path(args.out) / "prepared.txt", "a") as file:
            file.write("prepared\n")

    def setup(self, stage):
        self.prepared = (Path(args.out) / "prepared.txt").read_text().count("prepared")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        for group in optimizer.param_groups:  # linear warm-up over 4 steps, as Lightning users write it
            group["lr"] = 0.1 * min(1.0, (self.trainer.global_step + 1) / 4)
        optimizer.step(closure=optimizer_closure)
        self.lrs.append(optimizer.param_groups[0]["lr"])


torch.manual_seed(7)  # the same initial weights on every rank and in one process
x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
trainer = Trainer(
    devices=args.devices, max_epochs=3, log_every_n_steps=1, default_root_dir=args.out, enable_progress_bar=False
)
module = EagerRegression()
trainer.fit(module, DataLoader(data, batch_size=args.batch_size, shuffle=True))
if trainer.is_global_zero:
    rows = list(csv.DictReader(open(Path(args.out) / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    result = {
        "losses": losses,
        "world_size": trainer.world_size,
        "strategy": trainer.strategy.name,
        "lrs": module.lrs,
        "prepared": module.prepared,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result))
