"""A small regression trained with fit, then validated: the hooks a module sees, in order, and its losses."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import RecordingLogger, weights

HOOKS = (
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_epoch_start",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_validation_epoch_end",
    "on_validation_end",
    "on_train_end",
    "on_fit_end",
)


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.calls: list[str] = []
        self.batches: list[float] = []  # each training batch's sum: which samples this rank saw
        self.backward_losses: list[float] = []  # what the backward hook was given
        for hook in HOOKS:
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook):
        def record(*args, **kwargs):
            self.calls.append(hook)

        return record

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append(float(x.sum()))
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def backward(self, loss, *args, **kwargs):  # Lightning's hook, called in place of loss.backward()
        self.calls.append("backward")
        self.backward_losses.append(float(loss))
        loss.backward(*args, **kwargs)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 32) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def experiment(root: str, **trainer_kwargs) -> dict:
    torch.manual_seed(0)
    module = Regression()
    logger = RecordingLogger()
    trainer = L.Trainer(default_root_dir=root, logger=logger, max_epochs=2, log_every_n_steps=1, **trainer_kwargs)
    train = DataLoader(data(), batch_size=8)  # under several processes both shuffle it (DistributedSampler)
    trainer.fit(module, train, DataLoader(data(16), batch_size=8))
    return {
        "calls": module.calls,
        "rows": logger.rows,
        "weights": weights(module),
        "batches": module.batches,
        "backward_losses": module.backward_losses,
        "global_step": trainer.global_step,
    }
