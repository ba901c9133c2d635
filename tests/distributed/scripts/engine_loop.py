"""A hand-written loop on the Engine (no Trainer), launched with devices=N or under torchrun."""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Engine

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--steps", type=int, default=5)
args = parser.parse_args()

engine = Engine(accelerator="cpu", devices=args.devices, strategy="ddp")
engine.launch()
engine.seed_everything(0)
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 8, generator=g)
loader = engine.setup_dataloaders(
    DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32 // engine.world_size)
)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
model, optimizer = engine.setup(model, optimizer)
losses = []
for step in range(args.steps):
    for xb, yb in loader:
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        engine.backward(loss)
        engine.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(engine.all_reduce(loss.detach().clone()).item())
engine.save(Path(args.out) / "engine.ckpt", {"model": model, "optimizer": optimizer, "step": step})
state = {"model": model, "optimizer": optimizer, "step": -1}
engine.load(Path(args.out) / "engine.ckpt", state)
payload = {
    "rank": engine.global_rank,
    "world_size": engine.world_size,
    "source": engine.environment.source,
    "losses": losses,
    "restored_step": state["step"],
    "weights": sum(p.detach().sum().item() for p in model.parameters()),
}
(Path(args.out) / f"rank{engine.global_rank}.json").write_text(json.dumps(payload))
