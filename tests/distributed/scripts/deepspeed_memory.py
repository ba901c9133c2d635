"""Bytes of model state a DeepSpeed ZeRO run holds on each rank, stage by stage, from its real tensors.

One launch, ZeRO-1, 2 and 3 in turn (one training step each, fp32, DeepSpeed's CPU accelerator over
gloo). For each stage this rank writes:

* ``params``: the module's parameters as the rank stores them (ZeRO-1/2: the flat buffer every
  parameter is a view of; ZeRO-3: this rank's partition, ``ds_tensor``);
* ``grads``: the most gradient bytes the rank held at once during the backward (read each time a
  parameter's gradient is accumulated, and once more after the backward): ``param.grad`` and
  ``grad_accum`` of the module, and every tensor under an attribute of the ZeRO optimizer whose
  name says *grad* (its flat partition buffers), leaving out the reduce buckets that gradients are
  views of while they are reduced; ``grads_after`` is the figure after the backward;
* ``bucket``: the reduce buckets (``ipg_buckets``), the largest seen during the backward;
* ``master``: the fp32 copy of this rank's partition that the optimizer updates;
* ``optimizer``: the optimizer's state (AdamW's two moments) after the step.

Tensors are counted once per storage (views of one flat buffer are one allocation), by the
storage's size, so padding and whole buffers are included: what was allocated, not what is used.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import Callback, DeepSpeedStrategy, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--stages", default="1,2,3")
args = parser.parse_args()
out = Path(args.out)
CONFIG = GPTConfig(n_layer=4, n_head=4, d_model=256, seq_len=64)


def storages(tensors) -> dict[int, int]:
    return {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in tensors
        if torch.is_tensor(t) and t.numel() > 0
    }


def held_bytes(tensors, leaving_out: dict[int, int] | None = None) -> int:
    return sum(size for pointer, size in storages(tensors).items() if pointer not in (leaving_out or {}))


def bucket_storages(optimizer) -> dict[int, int]:
    """DeepSpeed's gradient reduce buckets (``ipg_buckets``): working memory, not gradients."""
    return storages(tree_leaves([bucket.buffer for bucket in getattr(optimizer, "ipg_buckets", {}).values()]))


def zero_optimizer(trainer):
    return trainer.strategy._engine.optimizer


def grad_tensors(module, optimizer):
    yield from (p.grad for p in module.parameters())
    yield from (getattr(p, "grad_accum", None) for p in module.parameters())
    for name, value in vars(optimizer).items():
        if "grad" in name.lower() and "scaler" not in name.lower():
            yield from tree_leaves(value)


class Measure(Callback):
    def on_before_backward(self, trainer, module, loss):
        optimizer = zero_optimizer(trainer)
        self.peak = self.bucket = 0

        def read(_):
            buckets = bucket_storages(optimizer)
            self.bucket = max(self.bucket, sum(buckets.values()))
            self.peak = max(self.peak, held_bytes(grad_tensors(module, optimizer), leaving_out=buckets))

        self.hooks = [p.register_post_accumulate_grad_hook(read) for p in module.parameters() if p.requires_grad]

    def on_after_backward(self, trainer, module):
        for hook in self.hooks:
            hook.remove()
        optimizer = zero_optimizer(trainer)
        self.grads_after = held_bytes(grad_tensors(module, optimizer), leaving_out=bucket_storages(optimizer))
        self.grads = max(self.peak, self.grads_after)

    def on_train_end(self, trainer, module):
        optimizer = zero_optimizer(trainer)
        if trainer.strategy.stage == 3:
            params = (p.ds_tensor for p in module.parameters())
            master = optimizer.fp32_partitioned_groups_flat
        else:
            params = module.parameters()
            master = optimizer.single_partition_of_fp32_groups
        self.result = {
            "params": held_bytes(params),
            "grads": self.grads,
            "grads_after": self.grads_after,
            "bucket": self.bucket,
            "master": held_bytes(master),
            "optimizer": held_bytes(
                t
                for state in optimizer.optimizer.state.values()
                for t in state.values()
                if torch.is_tensor(t) and t.dim() > 0
            ),
        }


results = {}
rank = 0
for stage in [int(s) for s in args.stages.split(",")]:
    torch.manual_seed(0)
    measure = Measure()
    tokens = torch.randint(0, 256, (16, CONFIG.seq_len + 1))
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=DeepSpeedStrategy(stage=stage),
        max_steps=1,
        callbacks=[measure],
        enable_progress_bar=False,
        logger=False,
    )
    trainer.fit(GPTModule(CONFIG), DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2))
    results[f"zero{stage}"] = measure.result
    rank = trainer.global_rank

out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **results}))
