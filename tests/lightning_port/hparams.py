"""save_hyperparameters in its forms (all arguments, ignore=, names, a dict, a subclass's arguments, a DataModule's),
what the loggers get, and load_from_checkpoint (recorded values, an override) of a module and a DataModule."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import RecordingLogger, weights


class Net(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.1, tags=("x",), extra: dict | None = None, activation=None):
        super().__init__()
        self.save_hyperparameters(ignore=["activation"])
        self.net = nn.Sequential(nn.Linear(4, self.hparams.hidden), activation or nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Deeper(Net):
    def __init__(self, depth: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.depth = depth


class Named(L.LightningModule):
    def __init__(self, a, b, c=3):
        super().__init__()
        self.save_hyperparameters("a", "c")


class FromDict(L.LightningModule):
    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters(config)


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int = 8, samples: int = 32):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        x = torch.randn(self.hparams.samples, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=self.hparams.batch_size)


def plain(hparams) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(hparams).items()}


def experiment(root: str, **trainer_kwargs) -> dict:
    torch.manual_seed(0)
    model = Deeper(depth=4, hidden=6, extra={"note": "kept"}, activation=nn.ReLU())
    datamodule = Data(batch_size=4)
    recording = RecordingLogger()
    trainer = L.Trainer(default_root_dir=root, max_epochs=1, logger=recording, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(f"{root}/model.ckpt")
    restored = Deeper.load_from_checkpoint(f"{root}/model.ckpt")
    overridden = Deeper.load_from_checkpoint(f"{root}/model.ckpt", lr=0.5)
    restored_data = Data.load_from_checkpoint(f"{root}/model.ckpt")
    return {
        "hparams": plain(model.hparams),
        "hparams_initial": plain(model.hparams_initial),
        "named": plain(Named(1, 2).hparams),
        "from_dict": plain(FromDict({"width": 3, "name": "d"}).hparams),
        "datamodule": plain(datamodule.hparams),
        "logged": plain(recording.hparams),
        "restored": plain(restored.hparams),
        "restored_depth": restored.depth,
        "restored_weights_equal": weights(restored) == weights(model),
        "overridden_lr": overridden.hparams.lr,
        "restored_datamodule": plain(restored_data.hparams),
        "restored_training": restored.training,
    }
