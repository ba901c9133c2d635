"""Save the same sharded state (FSDP, or ``--strategy model_parallel``: tensor parallel over the 2
ranks) synchronously and asynchronously (training on during the latter); report the time the
loop was blocked by each and what was written."""

import argparse
import json
import time
from pathlib import Path

import torch

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import Engine

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--width", type=int, default=256)
parser.add_argument("--strategy", default="fsdp")
args = parser.parse_args()
out = Path(args.out)

engine = Engine(accelerator="cpu", devices=2, strategy=args.strategy)
engine.launch()
engine.seed_everything(0)
module = GPTModule(GPTConfig(n_layer=args.layers, d_model=args.width, n_head=4, seq_len=64))
with engine.init_module():
    module.configure_model()
model = engine.setup_module(module)
optimizer = engine.setup_optimizers(torch.optim.AdamW(module.parameters(), lr=1e-3))[0]
tokens = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(engine.data_parallel_rank))


def train_step():
    loss = model.training_step((tokens[:, :-1], tokens[:, 1:]), 0)
    engine.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return engine.all_reduce(loss.detach().clone())


train_step()
state = {"model": model, "optimizer": optimizer, "step": 1}
start = time.perf_counter()
engine.save(out / "sync", state)
sync_blocked = time.perf_counter() - start
start = time.perf_counter()
engine.save(out / "async", state, asynchronous=True)
async_blocked = time.perf_counter() - start
committed_while_blocked = (out / "async" / "meta.json").exists()
losses = [train_step().item() for _ in range(3)]  # collectives on the default group while files are written
start = time.perf_counter()
engine.wait_for_checkpoint()
waited = time.perf_counter() - start
if engine.is_global_zero:
    (out / "result.json").write_text(
        json.dumps(
            {
                "sync_blocked": sync_blocked,
                "async_blocked": async_blocked,
                "waited_after_training": waited,
                "committed_before_return": committed_while_blocked,
                "losses": losses,
            }
        )
    )
