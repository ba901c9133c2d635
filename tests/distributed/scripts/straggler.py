"""2 ranks under DDP or FSDP; with ``--slow-rank 1`` that rank's dataset sleeps ``--delay`` seconds per sample, so
every step waits for its batch (``--slow-rank -1``: every rank's, a run slow but even). The StragglerMonitor's figures go to ``metrics.csv``; warnings to the output.

    python straggler.py --out DIR --strategy ddp --slow-rank 1 --delay 0.05
"""

import argparse
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from shardtrain import CSVLogger, StragglerMonitor, TrainModule, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--strategy", default="ddp")
parser.add_argument("--slow-rank", type=int, default=None, help="-1: every rank equally slow")
parser.add_argument("--delay", type=float, default=0.05)
args = parser.parse_args()


class Samples(Dataset):
    def __len__(self):
        return 4096

    def __getitem__(self, index):
        if args.slow_rank in (dist.get_rank(), -1):
            time.sleep(args.delay)
        return torch.full((16,), (index % 7) / 7)


class Module(TrainModule):
    def configure_model(self):
        self.layer = torch.nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


trainer = Trainer(
    accelerator="cpu",
    devices=2,
    strategy=args.strategy,
    max_steps=40,
    log_every_n_steps=4,
    hang_timeout_seconds=8,  # heartbeats every second (the interval follows the hang timeout)
    default_root_dir=args.out,
    logger=CSVLogger(args.out, name="", version=""),
    callbacks=[StragglerMonitor(threshold=0.1, patience=2)],
    enable_progress_bar=False,
    enable_checkpointing=False,
    enable_model_summary=False,
)
trainer.fit(Module(), DataLoader(Samples(), batch_size=4))
