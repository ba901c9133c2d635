"""Train the GPT example (4 blocks) with the Trainer, one process or pipeline stages, and write what each rank holds.

``--bare-positions``: the GPT with its learned positions as a bare ``nn.Parameter`` beside the blocks
(``pos``, as GPT-2 is often written by hand), in place of the ``position_embedding`` module.

Every rank writes its weights (its stages' parameters, under their unsplit names) to
``weights_rank<r>.safetensors``; rank 0 writes the logged losses and gradient norms to ``result.json``.
"""

import argparse
import csv
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from examples.gpt.data import corpus_splits
from examples.gpt.model import GPT, GPTConfig, GPTModule
from shardtrain import Callback, Trainer
from shardtrain.strategies import create_strategy

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--strategy", default="single")
parser.add_argument("--strategy-options", default="{}", help="JSON dict of strategy options")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--accumulate", type=int, default=1)
parser.add_argument("--max-steps", type=int, default=10)
parser.add_argument("--clip", type=float, default=0.5)
parser.add_argument("--val-check-interval", type=int, default=None)
parser.add_argument("--ckpt-path", default=None)
parser.add_argument("--save-at-end", action="store_true")
parser.add_argument("--async-save", action="store_true", help="save at the end asynchronously")
parser.add_argument("--stop-at", type=int, default=None, help="stop after this many steps (of --max-steps)")
parser.add_argument("--bare-positions", action="store_true", help="positions as a parameter beside the blocks")
args = parser.parse_args()


class BarePositionGPT(GPT):
    """The GPT example with ``x = token_embedding(tokens) + pos[:, :T]``: ``pos`` is the model's own parameter."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        del self.position_embedding
        self.pos = nn.Parameter(torch.empty(1, config.seq_len, config.d_model))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.pos[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class BarePositionModule(GPTModule):
    def configure_model(self) -> None:
        if self.model is None:
            with torch.device("meta"):
                self.model = BarePositionGPT(self.config)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.step is not None and trainer.global_step >= self.step:
            trainer.should_stop = True


config = GPTConfig(n_layer=4, n_head=2, d_model=32, seq_len=16)
train, val = corpus_splits(config.seq_len)
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=create_strategy(args.strategy, **json.loads(args.strategy_options)),
    max_steps=args.max_steps,
    accumulate_grad_batches=args.accumulate,
    gradient_clip_val=args.clip,
    val_check_interval=args.val_check_interval,
    limit_val_batches=2,
    log_every_n_steps=1,
    default_root_dir=args.out,
    seed=1234,
    enable_progress_bar=False,
    callbacks=[StopAt(args.stop_at)],
)
module = (BarePositionModule if args.bare_positions else GPTModule)(config, learning_rate=3e-3, warmup_steps=3)
trainer.fit(
    module,
    DataLoader(torch.utils.data.Subset(train, range(1024)), batch_size=args.batch_size, shuffle=True),
    DataLoader(val, batch_size=args.batch_size) if args.val_check_interval else None,
    ckpt_path=args.ckpt_path,
)
if args.save_at_end:
    trainer.save_checkpoint(asynchronous=args.async_save)
    trainer.engine.wait_for_checkpoint()
weights = {  # whole tensors: under FSDP over a stage's ranks, each gathers its stage's (a collective among them)
    name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().contiguous()
    for name, t in module.state_dict().items()
}
save_file(weights, str(Path(args.out) / f"weights_rank{trainer.global_rank}.safetensors"))
if trainer.is_global_zero:
    rows = list(csv.DictReader(open(Path(args.out) / "metrics.csv")))
    markers = [index for index, row in enumerate(rows) if row.get("resumed_from_step")]
    rows = rows[markers[-1] + 1 :] if markers else rows
    result = {
        "losses": [float(r["train_loss"]) for r in rows if r.get("train_loss")],
        "grad_norms": [float(r["train_grad_norm"]) for r in rows if r.get("train_grad_norm")],
        "val_losses": [float(r["val_loss"]) for r in rows if r.get("val_loss")],
        "global_step": trainer.global_step,
        "sharded": sorted(  # the parameters rank 0 holds a shard of (FSDP)
            name for name, p in module.named_parameters() if any(pl.is_shard() for pl in getattr(p, "placements", ()))
        ),
        "mesh": dict(zip(trainer.engine.device_mesh.mesh_dim_names, trainer.engine.device_mesh.shape))
        if args.devices > 1
        else None,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result))
