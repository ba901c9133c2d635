"""A classifier written the way Lightning's tutorials write one (layers in ``__init__``, a DataModule, hyperparameters,
a torchmetrics metric, a scheduler, checkpointing on a monitored metric, early stopping, learning-rate logging, a
CSV logger), then fitted, validated and tested on the best checkpoint, and used to predict.

Nothing here is written for shardtrain: the shardtrain run is this file with its imports changed.
"""

from __future__ import annotations

import os

import lightning.pytorch as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import RecordingLogger, weights


class BlobsDataModule(L.LightningDataModule):
    """Four Gaussian blobs in 8 dimensions; the data is "downloaded" (written) once in prepare_data."""

    def __init__(self, data_dir: str, batch_size: int = 16, samples: int = 256):
        super().__init__()
        self.save_hyperparameters()
        self.stages: list[str] = []

    def prepare_data(self):
        generator = torch.Generator().manual_seed(0)
        centers = torch.randn(4, 8, generator=generator) * 3
        labels = torch.arange(self.hparams.samples) % 4
        points = centers[labels] + torch.randn(self.hparams.samples, 8, generator=generator)
        torch.save({"x": points, "y": labels}, f"{self.hparams.data_dir}/blobs.pt")

    def setup(self, stage: str):
        self.stages.append(stage)
        data = torch.load(f"{self.hparams.data_dir}/blobs.pt")
        dataset = TensorDataset(data["x"], data["y"])
        n = len(dataset)
        self.train_set = torch.utils.data.Subset(dataset, range(0, n // 2))
        self.val_set = torch.utils.data.Subset(dataset, range(n // 2, 3 * n // 4))
        self.test_set = torch.utils.data.Subset(dataset, range(3 * n // 4, n))

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size)


class Classifier(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.05, classes: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=classes)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x, _ = batch
        return self(x).argmax(dim=-1)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def experiment(root: str, **trainer_kwargs) -> dict:
    os.makedirs(root, exist_ok=True)
    L.seed_everything(0)
    datamodule = BlobsDataModule(data_dir=root, batch_size=16)
    model = Classifier(hidden=32)
    checkpoint = ModelCheckpoint(
        dirpath=f"{root}/checkpoints",
        filename="{epoch}-{val_loss:.3f}",
        monitor="val_loss",
        save_top_k=2,
        save_last=True,
    )
    recording = RecordingLogger()
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=6,
        log_every_n_steps=2,
        callbacks=[checkpoint, EarlyStopping(monitor="val_loss", patience=2), LearningRateMonitor("epoch")],
        logger=[CSVLogger(save_dir=root, name="csv"), recording],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=datamodule)
    validated = trainer.validate(model, datamodule=datamodule, ckpt_path="best")
    tested = trainer.test(model, datamodule=datamodule, ckpt_path="best")
    predictions = trainer.predict(model, datamodule=datamodule)
    restored = Classifier.load_from_checkpoint(checkpoint.best_model_path)
    return {
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "hparams": dict(model.hparams),
        "datamodule_hparams": dict(datamodule.hparams),
        "datamodule_stages": datamodule.stages,
        "validated": validated,
        "tested": tested,
        "predictions": [p.tolist() for p in predictions],
        "best_score": float(checkpoint.best_model_score),
        "best_name": checkpoint.best_model_path.rsplit("/", 1)[-1],
        "restored_hparams": dict(restored.hparams),
        "restored_weights": weights(restored),
        "logged_keys": sorted({key for row in recording.rows for key in row}),
        "logged_hparams": {k: v for k, v in recording.hparams.items()},
        "csv_log_dir_name": trainer.loggers[0].log_dir.replace(root, "").lstrip("/"),
        "weights": weights(model),
    }
