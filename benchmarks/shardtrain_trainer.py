"""The same runs as the reference_*.py loops, through shardtrain's Trainer (devices=N, one strategy word)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import MODEL, SMALL, StepTimer, dataset, write_result
from examples.gpt.model import GPTModule
from shardtrain import Callback, FSDPStrategy, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--strategy", default="ddp")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--small", action="store_true")
parser.add_argument("--activation-checkpointing", action="store_true")
args = parser.parse_args()


class Timing(Callback):
    def __init__(self) -> None:
        self.timer = StepTimer()

    def on_train_start(self, trainer, module):
        self.timer.tick()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.timer.tick()


class ConstantLR(GPTModule):
    def configure_optimizers(self):  # the reference uses plain AdamW, no schedule or weight-decay groups
        return torch.optim.AdamW(self.parameters(), lr=3e-4)


config = SMALL if args.small else MODEL
timing = Timing()
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=FSDPStrategy(activation_checkpointing_policy={"Block"}) if args.activation_checkpointing else args.strategy,
    max_steps=args.steps,
    gradient_clip_val=1.0,
    log_every_n_steps=args.steps,
    default_root_dir=Path(args.out) / "logs",
    callbacks=[timing],
    enable_progress_bar=False,
)
torch.manual_seed(0)
trainer.fit(ConstantLR(config), DataLoader(dataset(config), batch_size=args.batch_size, shuffle=False, drop_last=True))
write_result(Path(args.out), trainer.global_rank, timing.timer.times, args.warmup, args.batch_size * trainer.world_size * config.seq_len, [])
