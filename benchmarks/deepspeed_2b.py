"""Train a GPT of more than 2 billion parameters on one small machine: ZeRO-3 with disk (NVMe) offload.

Not part of the test suite (it writes ~35 GB of swap files and takes minutes per step on 2
CPU cores). Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/deepspeed_2b.py --nvme-path /path/on/fast/disk --out benchmarks/results/deepspeed_2b

Every parameter, gradient and optimizer state lives on disk between uses; host memory holds
one transformer block being initialised, DeepSpeed's swap buffers (sized below) and
activations. Each rank writes ``rank<k>.json``: step times, peak RSS, bytes read and written.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import Callback, DeepSpeedStrategy, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--nvme-path", required=True)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--layers", type=int, default=26)
parser.add_argument("--d-model", type=int, default=2560)
parser.add_argument("--seq-len", type=int, default=64)
args = parser.parse_args()


def io_bytes() -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


class Measure(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer, module):
        self.start_io = io_bytes()
        self.setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        self.losses.append(float(outputs.detach() if isinstance(outputs, torch.Tensor) else outputs["loss"].detach()))
        print(
            f"[rank {trainer.global_rank}] step {trainer.global_step}: {self.times[-1]:.1f} s, loss {self.losses[-1]:.4f}",
            flush=True,
        )

    def on_train_end(self, trainer, module):
        read, written = io_bytes()
        result = {
            "parameters": module.config.num_parameters,
            "step_seconds": self.times,
            "losses": self.losses,
            "peak_rss_gib_at_train_start": self.setup_rss,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "disk_read_gib_during_training": (read - self.start_io[0]) / 2**30,
            "disk_written_gib_during_training": (written - self.start_io[1]) / 2**30,
            "steps": len(self.times),
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(result, indent=1))


config = GPTConfig(n_layer=args.layers, d_model=args.d_model, n_head=args.d_model // 128, seq_len=args.seq_len)
print(f"{config.num_parameters / 1e9:.2f}B parameters", flush=True)
tokens = torch.randint(0, 256, (args.devices * args.steps, args.seq_len + 1))
data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
strategy = DeepSpeedStrategy(
    stage=3,
    offload_optimizer=True,
    offload_parameters=True,
    offload_optimizer_device="nvme",
    offload_params_device="nvme",
    nvme_path=args.nvme_path,
    # Host memory is the limit here: every DeepSpeed buffer below is sized against one block
    # (4 * d_model**2 = 26M elements for the MLP weights), not left at defaults meant for 1 TB hosts.
    config={
        "zero_optimization": {
            "sub_group_size": 50_000_000,
            "stage3_max_live_parameters": 60_000_000,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 30_000_000,
            "stage3_param_persistence_threshold": 100_000,
            "reduce_bucket_size": 20_000_000,
            "offload_param": {"buffer_count": 6, "buffer_size": 30_000_000, "max_in_cpu": 0},
            "offload_optimizer": {"buffer_count": 4, "pipeline_read": False, "pipeline_write": False},
        },
        "aio": {"block_size": 1_048_576, "queue_depth": 8, "single_submit": False, "overlap_events": True},
    },
)
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=strategy,
    max_steps=args.steps,
    log_every_n_steps=1,
    default_root_dir=args.out,
    enable_progress_bar=False,
    callbacks=[Measure()],
)
trainer.fit(GPTModule(config, learning_rate=1e-4, warmup_steps=1), DataLoader(data, batch_size=1))
