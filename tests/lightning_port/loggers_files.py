"""Two file loggers given to the Trainer, as a Lightning user writes them: the directories and files they make
(twice, for version_0 and version_1), the metric names they hold, and the logger properties a module sees."""

from __future__ import annotations

import csv
import os

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.seen: dict = {}

    def on_train_start(self) -> None:
        root = self.trainer.default_root_dir
        self.seen = {
            "logger": type(self.logger).__name__,
            "loggers": [type(logger).__name__ for logger in self.loggers],
            "logger_is_trainers": self.logger is self.trainer.logger is self.trainer.loggers[0],
            "properties": [
                [
                    logger.name,
                    logger.version,
                    os.path.relpath(logger.save_dir, root),
                    os.path.relpath(logger.log_dir, root),
                    os.path.relpath(logger.root_dir, root),
                    logger.group_separator,
                ]
                for logger in self.loggers
            ]
            if self.global_rank == 0  # rank 0's: other ranks choose no version (they write nothing)
            else None,
            "log_dir": os.path.relpath(self.trainer.log_dir, root),
            "experiment": type(self.loggers[1].experiment).__name__.lstrip(
                "_"
            ),  # Lightning: _DummyExperiment off rank 0
        }
        self.logger.log_hyperparams({"lr": 0.1, "layers": [4, 1], "nested": {"width": 8}})
        self.loggers[1].log_hyperparams({"lr": 0.1, "nested": {"width": 8}})

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 16) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def files(root: str) -> list[str]:
    """Every file under ``root`` (relative; TensorBoard's event files by their kind, their names hold host and time)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.relpath(os.path.join(directory, name), root)
            if "checkpoints" in path.split(os.sep) or path.endswith(".ckpt"):
                continue  # where checkpoints go is the callbacks' business
            found.append(os.path.join(os.path.dirname(path), "events") if "tfevents" in name else path)
    return sorted(found)


def tensorboard(log_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def experiment(root: str, **trainer_kwargs) -> dict:
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        module = Regression()
        csv_logger = CSVLogger(save_dir=root, name="csv")
        tb_logger = TensorBoardLogger(save_dir=root, name="tb")
        trainer = L.Trainer(
            default_root_dir=root, logger=[csv_logger, tb_logger], max_steps=4, log_every_n_steps=1, **trainer_kwargs
        )
        trainer.fit(module, DataLoader(data(), batch_size=4), DataLoader(data(8), batch_size=4))
        if not trainer.is_global_zero:  # the files are rank 0's
            runs.append({"seen": module.seen, "log_dir": os.path.relpath(trainer.log_dir, root)})
            continue
        with open(os.path.join(csv_logger.log_dir, "metrics.csv"), newline="") as handle:
            rows = list(csv.DictReader(handle))
        with open(os.path.join(csv_logger.log_dir, "hparams.yaml")) as handle:
            csv_hparams = yaml.safe_load(handle)
        with open(os.path.join(tb_logger.log_dir, "hparams.yaml")) as handle:
            tb_hparams = yaml.safe_load(handle)
        runs.append(
            {
                "seen": module.seen,
                "csv_columns": sorted(rows[0]),
                "csv_steps": [row["step"] for row in rows],
                "csv_hparams": csv_hparams,
                "tb_hparams": tb_hparams,
                "tb_scalars": tensorboard(tb_logger.log_dir),
                "trainer_logger": type(trainer.logger).__name__,
                "log_dir": os.path.relpath(trainer.log_dir, root),
            }
        )
    return {"runs": runs, "files": files(root) if trainer.is_global_zero else None}
