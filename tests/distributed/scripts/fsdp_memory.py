"""Memory facts of an FSDP run, measured from real tensors and the process's peak RSS.

* ``--what init``: build a GPT on the meta device and shard it; report peak RSS growth during
  set-up against the full model's size (the full model must never exist on one rank).
* ``--what states``: after one training step, bytes of parameters, gradients and optimizer
  state this rank holds (falls as 1/N with FULL_SHARD).
* ``--what activations``: bytes saved for backward in one forward pass, with and without
  activation checkpointing (measured with a saved-tensors pack hook); under
  ``--strategy model_parallel`` also counted as the estimator counts them (each tensor once, no
  parameters, the local part of a DTensor).
"""

import argparse
import json
import resource
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import Callback, Engine, FSDPStrategy, ModelParallelStrategy, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--what", choices=["init", "states", "activations"], required=True)
parser.add_argument("--checkpointing", action="store_true")
parser.add_argument("--strategy", default="fsdp")
parser.add_argument("--sequence-parallel", action="store_true", help="model_parallel with the model's SP plan")
parser.add_argument("--context-parallel", type=int, default=1, help="model_parallel splitting each sequence")
args = parser.parse_args()
out = Path(args.out)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


if args.what == "init":
    config = GPTConfig(n_layer=8, n_head=16, d_model=1024, seq_len=128)  # ~101M parameters, 405 MB in fp32
    engine = Engine(accelerator="cpu", devices=args.devices, strategy=FSDPStrategy())
    engine.launch()
    module = GPTModule(config)
    before = rss_bytes()
    with engine.init_module():
        module.configure_model()
    engine.setup_module(module)
    growth = rss_bytes() - before
    full = sum(p.numel() * p.element_size() for p in module.parameters())  # DTensor sizes are global
    unit = max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in module.model.blocks)
    result = {
        "rank": engine.global_rank,
        "rss_growth": growth,
        "full_model_bytes": full,
        "largest_unit_bytes": unit,
        "local_param_bytes": local_bytes(module.parameters()),
    }
elif args.what == "states":
    config = GPTConfig(n_layer=4, n_head=4, d_model=256, seq_len=64)

    class Measure(Callback):
        def on_train_end(self, trainer, module):
            optimizer = trainer.optimizers[0]
            self.result = {
                "params": local_bytes(module.parameters()),
                "grads": 0,
                "optimizer": local_bytes(
                    t
                    for state in optimizer.state.values()
                    for t in state.values()
                    if torch.is_tensor(t) and t.dim() > 0
                ),
            }

        def on_before_optimizer_step(self, trainer, module, optimizer):
            # Lightning's order zeroes the gradients before each backward, so they are held here
            self.grads = local_bytes(p.grad for p in module.parameters() if p.grad is not None)

    measure = Measure()
    tokens = torch.randint(0, 256, (64, config.seq_len + 1))
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_steps=1,
        callbacks=[measure],
        enable_progress_bar=False,
        logger=False,
    )
    trainer.fit(GPTModule(config), DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2))
    result = {**measure.result, "grads": measure.grads, "rank": trainer.global_rank}
else:
    config = GPTConfig(n_layer=8, n_head=4, d_model=128, seq_len=256)
    policy = {"Block"} if args.checkpointing else None
    strategy = (
        ModelParallelStrategy(
            activation_checkpointing_policy=policy,
            sequence_parallel=args.sequence_parallel,
            context_parallel_size=args.context_parallel,
        )
        if args.strategy == "model_parallel"
        else FSDPStrategy(activation_checkpointing_policy=policy)
    )
    engine = Engine(accelerator="cpu", devices=args.devices, strategy=strategy)
    engine.launch()
    engine.seed_everything(0)
    module = GPTModule(config)
    with engine.init_module():
        module.configure_model()
    model = engine.setup_module(module)
    saved = []
    parameters = {id(p) for p in module.parameters()}  # model_parallel without FSDP: the tensors forward sees
    activations: dict[int, tuple] = {}  # as the estimator counts: each tensor once, parameters not, local sizes

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        if id(tensor) not in parameters:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            activations[id(tensor)] = (tensor, local.numel() * local.element_size())
        return tensor

    tokens = torch.randint(0, 256, (4, config.seq_len + 1))
    batch = (tokens[:, :-1].clone(), tokens[:, 1:].clone())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if args.context_parallel > 1:  # the step as the strategy runs it: each sequence split, forward and backward
            loss, _ = engine.forward_backward(model, lambda: (model.training_step(batch, 0), None), batch=batch)
        else:
            loss = model.training_step(batch, 0)
    if args.context_parallel == 1:
        loss.backward()
    if args.strategy == "model_parallel":  # split and whole parameters mixed: the Engine's clipping groups them
        grad_norm = engine.strategy.gradient_norm(list(module.parameters()), 2.0)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(list(module.parameters()), 1e9)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    result = {
        "rank": engine.global_rank,
        "saved_bytes": sum(saved),
        "activation_bytes": sum(nbytes for _, nbytes in activations.values()),
        "loss": loss.item(),
        "grad_norm": grad_norm.item(),
    }

out.mkdir(parents=True, exist_ok=True)
(out / f"rank{result['rank']}.json").write_text(json.dumps(result))
