"""Hand-written DDP training loop: plain PyTorch, started by torchrun. The reference we must match."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from common import MODEL, SMALL, StepTimer, dataset, write_result
from examples.gpt.model import GPT

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--small", action="store_true")
args = parser.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = SMALL if args.small else MODEL
torch.manual_seed(0)
model = DistributedDataParallel(GPT(config), gradient_as_bucket_view=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
data = dataset(config)
loader = DataLoader(data, batch_size=args.batch_size, sampler=DistributedSampler(data, shuffle=False), drop_last=True)
timer = StepTimer()
losses = []
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
    losses.append(loss.detach())
    timer.tick()
write_result(Path(args.out), rank, timer.times, args.warmup, args.batch_size * world * config.seq_len, [float(l) for l in losses])
dist.barrier()
dist.destroy_process_group()
