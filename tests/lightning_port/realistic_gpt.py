"""A small character-level GPT written the way community Lightning projects write one: hyperparameters saved, the
model built in ``__init__``, a linear warm-up done in an overridden ``optimizer_step``, a cosine schedule stepped
every optimizer step, gradient clipping and accumulation, a TensorBoard logger, a checkpoint every few steps and a
model restored from it with ``load_from_checkpoint``.

Nothing here is written for shardtrain: the shardtrain run is this file with its imports changed.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.lightning_port.recording import RecordingLogger, weights

TEXT = "the quick brown fox jumps over the lazy dog; " * 40


class CharDataset(Dataset):
    def __init__(self, text: str, block: int):
        self.vocab = sorted(set(text))
        self.ids = torch.tensor([self.vocab.index(c) for c in text])
        self.block = block

    def __len__(self):
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i):
        chunk = self.ids[i * self.block : i * self.block + self.block + 1]
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        # No in-projection bias: the key bias's gradient is zero up to rounding, which AdamW turns into steps of its
        # full size whose sign depends on the order of the reductions (DDP's all-reduce vs FSDP's reduce-scatter).
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(L.LightningModule):
    def __init__(
        self,
        vocab: int,
        block: int = 16,
        width: int = 32,
        depth: int = 2,
        heads: int = 2,
        lr: float = 3e-3,
        warmup_steps: int = 4,
        total_steps: int = 12,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(1, block, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.head = nn.Linear(width, vocab)
        self.lrs: list[float] = []

    def forward(self, idx):
        x = self.embed(idx) + self.pos[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten()), sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        cosine = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: 0.5 * (1 + math.cos(math.pi * min(step, self.hparams.total_steps) / self.hparams.total_steps)),
        )
        return [optimizer], [{"scheduler": cosine, "interval": "step"}]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.trainer.global_step < self.hparams.warmup_steps:  # linear warm-up over the scheduler's value
            scale = (self.trainer.global_step + 1) / self.hparams.warmup_steps
            for group in optimizer.param_groups:
                group["lr"] = scale * self.hparams.lr
        optimizer.step(closure=optimizer_closure)
        self.lrs.append(optimizer.param_groups[0]["lr"])


def experiment(root: str, **trainer_kwargs) -> dict:
    L.seed_everything(1)
    data = CharDataset(TEXT, block=16)
    model = GPT(vocab=len(data.vocab))
    checkpoint = ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=4, save_top_k=-1)
    recording = RecordingLogger()
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=12,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        log_every_n_steps=1,
        val_check_interval=8,
        limit_val_batches=2,
        callbacks=[checkpoint],
        logger=[TensorBoardLogger(save_dir=root, name="tb"), recording],
        **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    restored = GPT.load_from_checkpoint(checkpoint.best_model_path)  # the last save: no monitor
    return {
        "global_step": trainer.global_step,
        "lrs": model.lrs,
        "losses": [row["loss"] for row in recording.rows if "loss" in row],
        "val_losses": [row["val_loss"] for row in recording.rows if "val_loss" in row],
        "hparams": dict(model.hparams),
        "checkpoints": sorted(os.listdir(f"{root}/checkpoints")),
        "weights": weights(model),
        "restored_weights": weights(restored),
        "tb_log_dir": trainer.loggers[0].log_dir.replace(root, "").lstrip("/"),
    }
