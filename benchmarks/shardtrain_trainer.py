"""The same runs as the reference_*.py loops, through shardtrain's Trainer (devices=N, one strategy word).

With ``--monitor`` the run also carries a ThroughputMonitor, and its own figures (FLOPs counted
from the model, MFU) are written beside the benchmark's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import model_config, StepTimer, benchmark_arguments, dataset, write_result
from examples.gpt.model import GPTModule
from shardtrain import Callback, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, ThroughputMonitor, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "deepspeed", "model_parallel"])
parser.add_argument("--monitor", action="store_true", help="add a ThroughputMonitor and record its figures")
parser.add_argument(
    "--checkpoint-at-end",
    action="store_true",
    help="keep the Trainer's default checkpoint at the end of fit; the reference loops save nothing, and at 1.2B "
    "parameters each run's checkpoint (14 GB) filled a GPU machine's disk in a few rounds",
)
args = benchmark_arguments(parser)


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


def strategy():
    checkpointed = {"Block"} if args.activation_checkpointing else None
    if args.strategy == "fsdp":
        return FSDPStrategy(activation_checkpointing_policy=checkpointed)
    if args.strategy == "model_parallel" and args.pipeline_parallel > 1:
        return ModelParallelStrategy(
            pipeline_parallel_size=args.pipeline_parallel,
            pipeline_schedule=args.schedule,
            microbatches=args.microbatches,
        )
    if args.strategy == "model_parallel" and args.context_parallel > 1:
        return ModelParallelStrategy(context_parallel_size=args.context_parallel)
    if args.strategy == "model_parallel":
        return ModelParallelStrategy(tensor_parallel_size=args.tensor_parallel)
    if args.strategy == "deepspeed":
        return DeepSpeedStrategy(stage=args.stage, activation_checkpointing_policy=checkpointed)
    return "ddp"


config = model_config(args)
timing = Timing()
monitor = ThroughputMonitor(prog_bar=False)
trainer = Trainer(
    accelerator="auto",
    devices=args.devices,
    strategy=strategy(),
    precision=args.precision,
    max_steps=args.steps,
    gradient_clip_val=1.0,
    log_every_n_steps=args.steps,
    default_root_dir=Path(args.out) / "logs",
    callbacks=[timing, monitor] if args.monitor else [timing],
    enable_progress_bar=False,
    enable_checkpointing=args.checkpoint_at_end,
)
torch.manual_seed(0)
trainer.fit(ConstantLR(config), DataLoader(dataset(config), batch_size=args.batch_size, shuffle=False, drop_last=True))
extra = {}
if args.strategy == "deepspeed":  # the dict given to deepspeed.initialize, compared with the reference's
    extra["deepspeed_config"] = trainer.strategy.config
if args.monitor and trainer.is_global_zero:
    extra |= {
        "monitor": {
            k.removeprefix("throughput/"): v for k, v in trainer.callback_metrics.items() if k.startswith("throughput/")
        },
        "monitor_flops_per_batch": monitor.flops_per_batch,
        "monitor_peak_flops": monitor.peak_flops,
        "monitor_peak_source": monitor.peak_source,
    }
write_result(
    Path(args.out),
    trainer.global_rank,
    timing.timer.times,
    args.warmup,
    args.batch_size * trainer.engine.data_parallel_size * config.seq_len,
    extra,
)
