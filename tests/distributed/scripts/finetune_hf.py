"""Fine-tune a local Hugging Face checkpoint with ``shardtrain.hf.CausalLM`` and write the losses as JSON."""

import argparse
import csv
import json
from pathlib import Path

from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from shardtrain import ModelCheckpoint, Trainer
from shardtrain.hf import CausalLM
from shardtrain.strategies import create_strategy
from tests.distributed.hf_models import token_blocks


class Blocks(Dataset):
    def __init__(self):
        self.blocks = token_blocks()

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--strategy", default="single")
parser.add_argument("--strategy-options", default="{}")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--max-steps", type=int, default=1)
parser.add_argument("--freeze", nargs="*", default=[])
parser.add_argument("--save", action="store_true", help="checkpoint at the end")
parser.add_argument("--resume", default=None)
parser.add_argument("--precision", default="32-true")
parser.add_argument("--from-scratch", action="store_true", help="the checkpoint's config, seeded weights")
parser.add_argument("--dump", action="store_true", help="the full trained weights to weights.safetensors")
parser.add_argument("--lora", default=None, help="LoraConfig options as JSON: train adapters")
parser.add_argument("--trainable-only", action="store_true", help="--save: the trainable parameters only")
parser.add_argument("--frozen-dtype", default=None, help="CausalLM's frozen_dtype, e.g. bf16")
args = parser.parse_args()

module = CausalLM(
    args.model,
    from_scratch=args.from_scratch,
    learning_rate=1e-3,
    freeze=args.freeze,
    lora=json.loads(args.lora) if args.lora else None,
    frozen_dtype=args.frozen_dtype,
)
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=create_strategy(args.strategy, **json.loads(args.strategy_options)),
    max_steps=args.max_steps,
    precision=args.precision,
    log_every_n_steps=1,
    default_root_dir=args.out,
    seed=1234,
    enable_progress_bar=False,
    callbacks=[ModelCheckpoint(every_n_train_steps=args.max_steps, save_trainable_only=args.trainable_only)]
    if args.save
    else [],
)
trainer.fit(module, DataLoader(Blocks(), batch_size=args.batch_size, shuffle=True), ckpt_path=args.resume)
trainable = sum(p.requires_grad for p in module.parameters())
if args.dump:  # an independent path from checkpoints: the weights as the processes hold them
    if args.strategy == "deepspeed":
        full = trainer.strategy.module_state_dict(module, full=True)
    else:
        full = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in module.state_dict().items()}
    if trainer.is_global_zero:
        save_file(
            {n: t.detach().clone().contiguous() for n, t in full.items()}, str(Path(args.out) / "weights.safetensors")
        )
if trainer.is_global_zero:
    rows = list(csv.DictReader(open(Path(args.out) / "metrics.csv")))
    result = {
        "losses": [float(r["train_loss"]) for r in rows if r.get("train_loss")],
        "steps": [
            int(r["step"]) + 1 for r in rows if r.get("train_loss")
        ],  # rows at Lightning's step (batches before): +1 is the optimizer step
        "trainable_tensors": trainable,
        "grad_norms": [float(r["train_grad_norm"]) for r in rows if r.get("train_grad_norm")],
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result))
