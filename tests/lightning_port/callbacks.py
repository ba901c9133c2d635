"""Lightning's callbacks: ModelCheckpoint (monitor, filename template, save_top_k, save_last, every_n_train_steps,
the default one), EarlyStopping (patience; the epoch it stops at) and LearningRateMonitor (names, values per step)."""

from __future__ import annotations

import os

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import RecordingLogger


class Plateau(L.LightningModule):
    """A validation loss that improves for three epochs and then gets worse: early stopping has something to do."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_score", abs(self.current_epoch - 2) + 0.1 * batch_idx, sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def loader(n: int, seed: int, shuffle: bool = False) -> DataLoader:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4, shuffle=shuffle)


def listing(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if name != "last") if os.path.isdir(path) else []


def experiment(root: str, **trainer_kwargs) -> dict:
    torch.manual_seed(0)
    best = ModelCheckpoint(
        dirpath=f"{root}/best", filename="{epoch}-{val_score:.2f}", monitor="val_score", save_top_k=2, save_last=True
    )
    steps = ModelCheckpoint(dirpath=f"{root}/steps", filename="{epoch}-{step}", every_n_train_steps=3, save_top_k=-1)
    stopping = EarlyStopping(monitor="val_score", patience=2)
    recording = RecordingLogger()
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=10,
        log_every_n_steps=1,
        logger=recording,
        callbacks=[best, steps, stopping, LearningRateMonitor(logging_interval="step")],
        **trainer_kwargs,
    )
    trainer.fit(Plateau(), loader(16, 0, shuffle=trainer.world_size > 1), loader(8, 1))

    torch.manual_seed(0)
    default = L.Trainer(default_root_dir=f"{root}/default", max_epochs=2, logger=False, **trainer_kwargs)
    default.fit(Plateau(), loader(16, 0, shuffle=trainer.world_size > 1))
    return {
        "stopped_epoch": stopping.stopped_epoch,
        "wait_count": stopping.wait_count,
        "best_score_seen": float(stopping.best_score),
        "current_epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_files": listing(f"{root}/best"),
        "best_model_path": os.path.basename(best.best_model_path),
        "best_model_score": float(best.best_model_score),
        "best_k_models": sorted(os.path.basename(p) for p in best.best_k_models),
        "last_model_path": os.path.basename(best.last_model_path),
        "step_files": listing(f"{root}/steps"),
        "is_first_callback": trainer.checkpoint_callback is best,
        "early_stopping_callback": trainer.early_stopping_callback is stopping,
        "lrs": [(row["step"], row["lr-SGD"]) for row in recording.rows if "lr-SGD" in row],
        "checkpoint_saves": recording.checkpoint_saves,
        "default_files": len(listing(default.checkpoint_callback.dirpath)),
    }
