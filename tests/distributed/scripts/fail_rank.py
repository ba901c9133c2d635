"""A DDP run in which one rank fails at a given step: by exception, by SIGKILL, or with a NaN loss."""

import argparse
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import TrainModule, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--fail-rank", type=int, default=1, help="-1: every rank")
parser.add_argument("--fail-step", type=int, default=3)
parser.add_argument("--how", choices=["raise", "kill", "hang-others", "nan"], default="raise")
parser.add_argument("--on-nonfinite", default="ignore")
parser.add_argument("--max-steps", type=int, default=50)
args = parser.parse_args()


class Failing(TrainModule):
    def configure_model(self):
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        if args.fail_rank in (self.global_rank, -1) and self.global_step == args.fail_step:
            Path(args.out, "fault_injected.json").write_text(
                json.dumps({"time": time.time(), "step": self.global_step + 1})
            )
            if args.how in ("raise", "hang-others"):
                raise RuntimeError(f"planted failure on rank {self.global_rank}")
            if args.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.how == "nan":
                return self.layer(batch[0]).pow(2).mean() * float("nan")
        if args.how == "hang-others" and self.global_rank != args.fail_rank and self.global_step == args.fail_step:
            time.sleep(3600)  # stuck outside any collective: only the watchdog can end this
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


data = DataLoader(TensorDataset(torch.randn(256, 4)), batch_size=4)
trainer = Trainer(
    accelerator="cpu",
    devices=2,
    max_steps=args.max_steps,
    default_root_dir=args.out,
    enable_progress_bar=False,
    timeout_seconds=60,
    on_nonfinite=args.on_nonfinite,
)
module = Failing()
trainer.fit(module, data)
weights = [p.detach().flatten().tolist() for p in module.parameters()]
Path(args.out, f"rank{trainer.global_rank}.json").write_text(
    json.dumps(
        {
            "global_step": trainer.global_step,
            "skipped_steps": trainer.nonfinite.skipped_steps,
            "finite": all(math.isfinite(v) for w in weights for v in w),
            "weights": weights,
        }
    )
)
