"""Data and layers across processes: the training data Lightning shuffles under ddp (a loader made with shuffle=False),
``use_distributed_sampler=False`` (each rank keeps the loader as made) and ``sync_batchnorm`` (statistics over ranks)."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import weights


class Normed(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.batches: list[float] = []
        self.layers: list[str] = []

    def on_train_start(self):
        self.layers = [type(layer).__name__ for layer in self.net]

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append(round(float(x.sum()), 4))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 32) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def experiment(root: str, **trainer_kwargs) -> dict:
    torch.manual_seed(0)
    module = Normed()
    options = {"max_epochs": 2, "logger": False, "num_sanity_val_steps": 0, **trainer_kwargs}
    trainer = L.Trainer(default_root_dir=root, **options)
    trainer.fit(module, DataLoader(data(), batch_size=4))
    stats = {name: buffer.flatten().tolist() for name, buffer in module.named_buffers() if "running" in name}
    return {"batches": module.batches, "weights": weights(module), "stats": stats, "layers": module.layers}
