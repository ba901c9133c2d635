"""Train a small regression on shuffled map-style data whose ``__getitem__`` counts calls, and write
the losses (reduced over ranks, from metrics.csv) and every rank's loaded indices as JSON."""

import argparse
import csv
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from shardtrain import TrainModule, Trainer


class CountingDataset(Dataset):
    def __init__(self, size):
        self.size, self.loaded = size, []

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        self.loaded.append(index)
        g = torch.Generator().manual_seed(index)
        x = torch.randn(8, generator=g)
        return x, x.sum(dim=0, keepdim=True).sin()


class CountingStream(IterableDataset):
    """Rank r's share of the samples (i % world == r) as a stream; its position is a state_dict."""

    def __init__(self, size):
        self.size, self.loaded, self.next_index = size, [], None

    def __iter__(self):
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.next_index is None:
            self.next_index = rank
        while self.next_index < self.size:
            index, self.next_index = self.next_index, self.next_index + world
            self.loaded.append(index)
            g = torch.Generator().manual_seed(index)
            x = torch.randn(8, generator=g)
            yield x, x.sum(dim=0, keepdim=True).sin()
        self.next_index = None

    def state_dict(self):
        return {"next_index": self.next_index}

    def load_state_dict(self, state):
        self.next_index = state["next_index"]


class Regression(TrainModule):
    def configure_model(self):
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=8, help="per process")
parser.add_argument("--samples", type=int, default=512)
parser.add_argument("--max-steps", type=int, default=80)
parser.add_argument("--ckpt-path", default=None)
parser.add_argument("--save-at-end", action="store_true")
parser.add_argument("--stream", action="store_true", help="an IterableDataset through torchdata's StatefulDataLoader")
args = parser.parse_args()

if args.stream:
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = CountingStream(args.samples)
    loader = StatefulDataLoader(dataset, batch_size=args.batch_size)
else:
    dataset = CountingDataset(args.samples)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy="ddp" if args.devices > 1 else "single",
    max_steps=args.max_steps,
    log_every_n_steps=1,
    default_root_dir=args.out,
    seed=11,
    enable_progress_bar=False,
)
trainer.fit(Regression(), loader, ckpt_path=args.ckpt_path)
if args.save_at_end:
    trainer.save_checkpoint()
out = Path(args.out)
(out / f"loaded_rank{trainer.global_rank}_{os.getpid()}.json").write_text(json.dumps(dataset.loaded))
if trainer.is_global_zero:
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    markers = [index for index, row in enumerate(rows) if row.get("resumed_from_step")]
    rows = rows[markers[-1] + 1 :] if markers else rows
    losses = {
        int(r["step"]) + 1: float(r["train_loss"]) for r in rows if r.get("train_loss")
    }  # rows at Lightning's step (batches before): +1 is the optimizer step
    (out / "result.json").write_text(
        json.dumps({"steps": sorted(losses), "losses": [losses[s] for s in sorted(losses)]})
    )
