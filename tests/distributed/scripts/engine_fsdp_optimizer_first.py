"""Fabric style under FSDP: the optimizer is built before engine.setup(model, optimizer)."""

import argparse
import json
from pathlib import Path

import torch

from shardtrain import Engine

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--strategy", default="fsdp")
args = parser.parse_args()
engine = Engine(accelerator="cpu", devices=2, strategy=args.strategy)
engine.launch()
engine.seed_everything(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer = engine.setup(model, optimizer)
x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
xs = x[engine.global_rank :: 2]
losses = []
for _ in range(5):
    loss = (model(xs) - xs.sum(1, keepdim=True)).pow(2).mean()
    engine.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    losses.append(engine.all_reduce(loss.detach().clone()).item())
if engine.is_global_zero:
    (Path(args.out) / "result.json").write_text(json.dumps({"losses": losses}))
