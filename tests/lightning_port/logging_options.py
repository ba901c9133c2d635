"""self.log with Lightning's options from the steps and the epoch hooks: on_step/on_epoch (forked names), reduce_fx,
batch-size weighting of unequal batches, sync_dist, logger=False, prog_bar, log_dict, a torchmetrics Metric; the rows
the loggers get and the callback and progress-bar metrics."""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import RecordingLogger

#: shardtrain's own figures (the step's loss and gradient norm), which Lightning does not log.
OWN = ("train_loss", "train_grad_norm")


class Logs(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.mse = torchmetrics.MeanSquaredError()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("plain", loss)
        self.log("forked", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("peak", x.abs().max(), on_step=False, on_epoch=True, reduce_fx="max")
        self.log("mean_x", x.mean(), sync_dist=True)
        self.log("hidden", loss * 3, logger=False)
        self.log_dict({"dict_a": loss * 2, "dict_b": float(batch_idx)}, on_epoch=True)
        return loss

    def on_train_epoch_end(self):
        self.log("train_epoch_end", float(self.current_epoch) + 0.5)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        prediction = self.net(x)
        self.mse.update(prediction, y)
        self.log("val_loss", nn.functional.mse_loss(prediction, y), prog_bar=True)  # weighted by the batch sizes
        self.log("val_given", float(batch_idx), batch_size=1 + batch_idx)
        self.log("val_sum", 1.0, reduce_fx="sum")
        self.log("val_synced", nn.functional.mse_loss(prediction, y), sync_dist=True)
        self.log("val_mse", self.mse)
        self.log("val_batch_index", float(batch_idx), on_step=True, on_epoch=False)  # a row per batch, at its index

    def on_validation_epoch_end(self):
        self.log("val_epoch_end", float(self.current_epoch) + 0.25)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def experiment(root: str, **trainer_kwargs) -> dict:
    torch.manual_seed(0)
    model = Logs()
    recording = RecordingLogger()
    trainer = L.Trainer(default_root_dir=root, max_epochs=2, log_every_n_steps=2, logger=recording, **trainer_kwargs)
    val_loader = DataLoader(data(11, 1), batch_size=4)  # batches of 4, 4 and 3 (per rank under ddp: 2, 2, 2)
    trainer.fit(model, DataLoader(data(24, 0), batch_size=8, shuffle=trainer.world_size > 1), val_loader)
    trainer.validate(model, val_loader)  # after fit: its rows at the fit's step count
    rows = [{k: v for k, v in row.items() if k not in OWN} for row in recording.rows]
    return {
        "rows": [row for row in rows if set(row) - {"epoch", "step"}],  # the step at which each row is written
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k not in OWN},
        "progress_bar_metrics": sorted(k for k in trainer.progress_bar_metrics if k not in OWN),
    }
