"""Train a small Hugging Face Llama (random weights from a config, nothing downloaded) with the Trainer
and write the per-step losses as JSON. The module has no tensor-parallel code: under
``strategy="model_parallel"`` the plan is the model's own (``LlamaConfig.base_model_tp_plan``)."""

import argparse
import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from transformers import LlamaConfig, LlamaForCausalLM

from examples.gpt.data import corpus_splits
from shardtrain import Trainer, TrainModule
from shardtrain.strategies import create_strategy


class LlamaModule(TrainModule):
    def __init__(self, **config) -> None:
        super().__init__()
        self.config = LlamaConfig(**config)  # head counts are checked against the TP degree before launch
        self.model = None

    def configure_model(self) -> None:
        with torch.device("meta"):  # the strategy materialises it with the model's own _init_weights
            self.model = LlamaForCausalLM(self.config)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        logits = self.model(input_ids=inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--strategy", default="single")
parser.add_argument("--strategy-options", default="{}")
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--kv-heads", type=int, default=2)
parser.add_argument("--tie", action="store_true", help="tie the output layer to the embedding")
args = parser.parse_args()

seq_len = 32
module = LlamaModule(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=args.kv_heads,
    max_position_embeddings=seq_len,
    tie_word_embeddings=args.tie,
    attn_implementation="sdpa",
)
train, _ = corpus_splits(seq_len)
trainer = Trainer(
    accelerator="cpu",
    devices=args.devices,
    strategy=create_strategy(args.strategy, **json.loads(args.strategy_options)),
    max_steps=10,
    gradient_clip_val=0.5,
    log_every_n_steps=1,
    default_root_dir=args.out,
    seed=1234,
    enable_progress_bar=False,
)
trainer.fit(module, DataLoader(Subset(train, range(1024)), batch_size=args.batch_size, shuffle=True))
split = sorted(name for name, p in module.named_parameters() if hasattr(p, "device_mesh"))
if trainer.is_global_zero:
    rows = list(csv.DictReader(open(Path(args.out) / "metrics.csv")))
    result = {
        "losses": [float(r["train_loss"]) for r in rows if r.get("train_loss")],
        "grad_norms": [float(r["train_grad_norm"]) for r in rows if r.get("train_grad_norm")],
        "split_parameters": split,
        "tied": module.model.lm_head.weight is module.model.model.embed_tokens.weight,
    }
    (Path(args.out) / "result.json").write_text(json.dumps(result))
