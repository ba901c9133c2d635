"""A loop of one's own on the Engine under context parallelism: the GPT example's module, each step through
engine.forward_backward (which splits the batch's sequences), or with --direct-backward through engine.backward."""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from examples.gpt.data import corpus_splits
from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import Engine, ModelParallelStrategy

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--context-parallel", type=int, default=2)
parser.add_argument("--direct-backward", action="store_true")
parser.add_argument("--dropout", type=float, default=0.0)
args = parser.parse_args()

strategy = ModelParallelStrategy(context_parallel_size=args.context_parallel) if args.devices > 1 else "single"
engine = Engine(accelerator="cpu", devices=args.devices, strategy=strategy)
engine.launch()
engine.seed_everything(0)
config = GPTConfig(n_layer=2, n_head=2, d_model=64, seq_len=32, dropout=args.dropout)
module = GPTModule(config)
with engine.init_module():
    module.configure_model()
train, _ = corpus_splits(config.seq_len)
loader = engine.setup_dataloaders(DataLoader(Subset(train, range(64)), batch_size=8))
model, optimizer = engine.setup(module, torch.optim.AdamW(module.parameters(), lr=3e-3))
losses = []
for tokens, targets in loader:

    def compute_loss(tokens=tokens, targets=targets):
        logits = model(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), None

    if args.direct_backward:
        loss, _ = compute_loss()
        engine.backward(loss)
    else:
        loss, _ = engine.forward_backward(model, compute_loss, batch=(tokens, targets))
    optimizer.step()
    optimizer.zero_grad()
    losses.append(engine.all_reduce(loss.detach().clone()).item())
if engine.global_rank == 0:
    (Path(args.out) / "result.json").write_text(json.dumps({"losses": losses}))
