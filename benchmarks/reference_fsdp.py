"""Hand-written FSDP2 training loop: plain PyTorch (fully_shard per block, then the root), started by torchrun."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler

from common import MODEL, SMALL, StepTimer, dataset, write_result
from examples.gpt.model import GPT

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--small", action="store_true")
parser.add_argument("--activation-checkpointing", action="store_true")
args = parser.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = SMALL if args.small else MODEL
torch.manual_seed(0)
model = GPT(config)
mesh = init_device_mesh("cpu", (world,))
for block in model.blocks:
    if args.activation_checkpointing:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
data = dataset(config)
loader = DataLoader(data, batch_size=args.batch_size, sampler=DistributedSampler(data, shuffle=False), drop_last=True)
timer = StepTimer()
timer.tick()
for step, (x, y) in enumerate(loader):
    if step == args.steps:
        break
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer.tick()
write_result(Path(args.out), rank, timer.times, args.warmup, args.batch_size * world * config.seq_len, [])
dist.barrier()
dist.destroy_process_group()
