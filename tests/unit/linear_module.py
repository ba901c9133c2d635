"""One tiny TrainModule for unit tests that need a model to train and validate, and nothing else."""

import torch

from shardtrain import TrainModule


class LinearRegression(TrainModule):
    """``Linear(4, 1)`` fitted by SGD with mean-squared error; logs ``val_loss`` in validation."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr

    def configure_model(self):
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
