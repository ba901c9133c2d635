"""A 2-rank run in which one rank stops somewhere at step 3, for the hang reports (``shardtrain.launch.heartbeat``).

    python hang.py --out DIR --strategy ddp --where sleep --hang-timeout 10 --timeout 60

``--where``: ``sleep`` (rank 1 sleeps inside ``training_step``), ``data`` (rank 1's dataset sleeps reading a
sample), ``collective`` (rank 0 calls a barrier that rank 1 never calls), ``nowhere`` (a healthy run).
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from shardtrain import TrainModule, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--strategy", default="ddp")
parser.add_argument("--where", choices=("sleep", "data", "collective", "nowhere"), required=True)
parser.add_argument("--timeout", type=float, default=60)
parser.add_argument("--hang-timeout", type=float, default=None)
parser.add_argument("--engine", action="store_true", help="a loop of its own on the Engine (with --where sleep)")
args = parser.parse_args()
STUCK_STEP = 3


def mark_fault() -> None:
    """When the fault starts, for benchmarks/faults.py's detection times."""
    Path(args.out, "fault_injected.json").write_text(json.dumps({"time": time.time()}))


class Samples(Dataset):
    read = 0

    def __len__(self):
        return 64

    def __getitem__(self, index):
        Samples.read += 1
        if args.where == "data" and dist.get_rank() == 1 and Samples.read > STUCK_STEP * 4:  # the batch of step 3
            mark_fault()
            time.sleep(1000)  # rank 1 stuck reading a sample
        return torch.full((8,), float(index))


class Module(TrainModule):
    def configure_model(self):
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        if self.global_step == STUCK_STEP:
            if args.where == "sleep" and dist.get_rank() == 1:
                mark_fault()
                time.sleep(1000)  # rank 1 stuck outside any collective
            if args.where == "collective" and dist.get_rank() == 0:
                mark_fault()
                dist.barrier()  # a collective rank 1 skips
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


if args.engine:  # a loop of its own that reports where it is with engine.progress(step, phase)
    from shardtrain import Engine

    engine = Engine(
        accelerator="cpu", devices=2, strategy=args.strategy,
        timeout_seconds=args.timeout, hang_timeout_seconds=args.hang_timeout,
    )  # fmt: skip
    engine.launch()
    engine.report_hangs_to(args.out)
    layer = torch.nn.Linear(8, 1)
    model, optimizer = engine.setup(layer, torch.optim.SGD(layer.parameters(), lr=0.01))
    for step in range(8):
        engine.progress(step, "step")
        if step == STUCK_STEP and dist.get_rank() == 1:
            mark_fault()
            time.sleep(1000)  # rank 1 stuck in a loop of its own
        engine.backward(model(torch.randn(4, 8)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
    raise SystemExit(0)

trainer = Trainer(
    accelerator="cpu",
    devices=2,
    strategy=args.strategy,
    max_steps=8,
    timeout_seconds=args.timeout,
    hang_timeout_seconds=args.hang_timeout,
    default_root_dir=args.out,
    logger=False,
    enable_progress_bar=False,
    enable_checkpointing=False,
    enable_model_summary=False,
)
trainer.fit(Module(), DataLoader(Samples(), batch_size=4))
if args.where == "nowhere":
    time.sleep(6)  # work of the script's own after fit, longer than the test's hang timeout: not a hang
