"""The strategy contract, for every registered strategy in ONE launched job (one world size).

For each name (``available_strategies()`` after any ``--register`` plug-ins), in a fresh Engine:
a tiny seeded model built under ``engine.init_module()``, AdamW, clipping by norm, ``--steps``
steps over the same global batches (``batch_size`` per rank = global batch / world size); a
checkpoint after ``--save-after`` steps; then a second fresh Engine with a differently seeded
model loads it and runs the remaining steps. After each strategy every rank rewrites
``rank<R>.json``::

    {"world_size": N, "strategies": {name: {"losses": [...], "grad_norms": [[per rank], ...],
                                            "final_loss": x, "resumed": {...}, "options": {...},
                                            "seconds": s}
                                     or {"refused": "ErrorType: message", ...}
                                     or {<what passed before it failed>, "error": "traceback"}}}

``refused``: ``Engine(...)`` raised, before any collective (the strategy does not run at this
world size); the job goes on. ``error``: the rank stops the job at once (its peers' collectives
may no longer match theirs); the test runs the remaining names in another job. ``--option-values`` is a JSON table keyed by option name (``{"nvme_path": dir}``):
a strategy whose creation fails with a message naming one of them is created again with it.
"""

import argparse
import importlib
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Engine
from shardtrain.strategies import available_strategies, create_strategy

GLOBAL_BATCH = 8
FEATURES = 8
MAX_NORM = 0.5

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, required=True)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--save-after", type=int, default=2)
parser.add_argument("--register", action="append", default=[], help="module:function that registers strategies")
parser.add_argument("--option-values", default="{}", help="JSON: option name -> value, for strategies that need one")
parser.add_argument("--only", action="append", default=[], help="run only these names (default: all)")
parser.add_argument("--timeout-seconds", type=float, default=180.0)
args = parser.parse_args()

for target in args.register:
    module_name, _, attribute = target.partition(":")
    getattr(importlib.import_module(module_name), attribute)()

OPTION_VALUES = json.loads(args.option_values)
OUT = Path(args.out)

generator = torch.Generator().manual_seed(1234)
inputs = torch.randn(GLOBAL_BATCH * args.steps, FEATURES, generator=generator)
targets = (inputs**2).mean(dim=1, keepdim=True) + 1.0  # away from the initial outputs: norms above MAX_NORM
dataset = TensorDataset(inputs, targets)


class TinyMLP(torch.nn.Sequential):
    #: For strategies that split layers (model_parallel): the hidden units between the ranks.
    tp_plan = {"0": "colwise", "2": "rowwise"}


def make_model() -> torch.nn.Module:
    return TinyMLP(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def new_engine(name: str) -> tuple[Engine, dict]:
    """An Engine for ``name``; options from the table when the error names them (raises as Engine(...) does)."""
    try:
        return Engine(accelerator="cpu", devices=args.devices, strategy=name, timeout_seconds=args.timeout_seconds), {}
    except Exception as error:
        needed = {option: value for option, value in OPTION_VALUES.items() if option in str(error)}
        if not needed:
            raise
    strategy = create_strategy(name, **needed)
    return Engine(
        accelerator="cpu", devices=args.devices, strategy=strategy, timeout_seconds=args.timeout_seconds
    ), needed


def set_up(engine: Engine, seed: int):
    engine.seed_everything(seed)
    with engine.init_module():
        model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, optimizer = engine.setup(model, optimizer)
    loader = engine.setup_dataloaders(DataLoader(dataset, batch_size=GLOBAL_BATCH // engine.data_parallel_size))
    return model, optimizer, loader


def loss_over_all_samples(model) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(inputs), targets).item()


def train(engine: Engine, model, optimizer, batches, checkpoint: Path | None = None) -> dict:
    losses, grad_norms, saved = [], [], {}
    for step, (x, y) in enumerate(batches):
        loss = torch.nn.functional.mse_loss(model(x), y)
        engine.backward(loss, model)
        norm = engine.clip_gradients(model, optimizer, max_norm=MAX_NORM)
        optimizer.step()  # DeepSpeed clips inside its step: its norm is known only after it
        grad_norms.append(engine.all_gather(norm.detach().reshape(()).float()).tolist())
        optimizer.zero_grad()
        losses.append(engine.all_reduce(loss.detach().clone(), "mean").item())
        if checkpoint is not None and step + 1 == args.save_after:
            engine.save(checkpoint, {"model": model, "optimizer": optimizer})
            saved["loss_at_save"] = loss_over_all_samples(model)
    # The loss over every sample after the last step: checks the last update too.
    return {"losses": losses, "grad_norms": grad_norms, "final_loss": loss_over_all_samples(model), **saved}


def run(name: str, result: dict) -> None:
    """Fill ``result`` as the contract's parts pass, so that a failure keeps what came before it."""
    try:
        engine, options = new_engine(name)
    except Exception as error:  # before any collective: the other ranks refuse it the same way
        result["refused"] = f"{type(error).__name__}: {error}"
        return
    engine.launch()
    checkpoint = OUT / "checkpoints" / name
    model, optimizer, loader = set_up(engine, seed=0)
    result.update(options=options, world_size=engine.world_size)
    result.update(train(engine, model, optimizer, loader, checkpoint))
    engine.teardown()

    # A new run: another Engine, a differently initialised model and a fresh optimizer load the checkpoint.
    engine, _ = new_engine(name)
    engine.launch()
    model, optimizer, loader = set_up(engine, seed=1)
    loss_before_load = loss_over_all_samples(model)
    engine.load(checkpoint, {"model": model, "optimizer": optimizer})
    resumed = train(engine, model, optimizer, itertools.islice(loader, args.save_after, None))
    result["resumed"] = {**resumed, "loss_before_load": loss_before_load}
    engine.teardown()


results: dict = {}
for name in args.only or available_strategies():
    results[name] = {}
    started = time.perf_counter()
    try:
        run(name, results[name])
    except BaseException:
        results[name]["error"] = traceback.format_exc()
    results[name]["seconds"] = round(time.perf_counter() - started, 2)
    rank = int(os.environ.get("RANK", "0"))  # set by the launcher in every rank; unset: one process
    (OUT / f"rank{rank}.json").write_text(json.dumps({"world_size": args.devices, "strategies": results}, indent=1))
    if "error" in results[name]:
        # The ranks' collectives may no longer match: stop at once (no exit barrier), so that the
        # peers fail fast instead of waiting for the timeout; the test starts a job for the rest.
        print(f"[strategy_contract] rank {rank}: {name} failed:\n{results[name]['error']}", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
