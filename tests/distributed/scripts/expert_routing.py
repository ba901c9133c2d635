"""Experts written as transformers' eager loop (each expert's weights indexed only when a row names it), with the
routing fixed by the data: under expert parallelism some ranks receive no token at all. Writes the trained weights'
sum and each parameter's full gradient norm of the first step, so a test can compare layouts with one process."""

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shardtrain import Callback, TrainModule, Trainer
from shardtrain.strategies import create_strategy

WIDTH, EXPERTS = 8, 4


class LoopExperts(nn.Module):
    """transformers' eager experts: a loop over the experts the rows name."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = EXPERTS
        self.weight = nn.Parameter(torch.empty(EXPERTS, WIDTH, WIDTH))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            rows, slot = torch.where(top_k_index == expert)
            value = hidden_states[rows] @ self.weight[expert].T * top_k_weights[rows, slot, None]
            out = out.index_add(0, rows, value)
        return out


class Routed(TrainModule):
    def configure_model(self) -> None:
        with torch.device("meta"):
            self.embed = nn.Linear(WIDTH, WIDTH)
            self.experts = LoopExperts()

    def training_step(self, batch, batch_idx):
        x, route = batch
        hidden = self.embed(x)
        out = self.experts(hidden, route[:, None], torch.ones(len(route), 1))
        return out.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Samples(Dataset):
    """Sample i goes to the data-parallel rank i % 4 (no shuffling). Ranks 0 and 1 send theirs to experts 0 and 1 (held
    by the first rank of each expert-parallel pair), ranks 2 and 3 to experts 2 and 3 (the second): under
    expert_parallel_size=2 over 4 ranks, ranks 1 and 2 receive no row."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = torch.randn(WIDTH, generator=torch.Generator().manual_seed(i))
        return x, torch.tensor(i % 2 if i % 4 < 2 else 2 + i % 2)


class FirstGradients(Callback):
    norms: dict | None = None

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.norms is None:
            full = {
                n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                for n, p in module.named_parameters()
            }
            self.norms = {name: grad.norm().item() for name, grad in full.items()}


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--strategy", default="single")
parser.add_argument("--strategy-options", default="{}")
args = parser.parse_args()

grads = FirstGradients()
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=create_strategy(args.strategy, **json.loads(args.strategy_options)),
    max_steps=2,
    seed=3,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    callbacks=[grads],
)
module = Routed()
trainer.fit(module, DataLoader(Samples(), batch_size=16 // args.devices, shuffle=False))
weights = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in module.named_parameters()}
if trainer.is_global_zero:
    result = {"gradient_norms": grads.norms, "weight_sums": {n: w.double().sum().item() for n, w in weights.items()}}
    (Path(args.out) / "result.json").write_text(json.dumps(result))
