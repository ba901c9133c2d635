"""fit, validate, test and predict of one module and DataModule: the hooks of every stage in order (module,
DataModule), what validate/test return (one loader and two), predictions, and test on a saved checkpoint's weights.
The batch-transfer hooks change the batches (the module's before and during the transfer, the DataModule's after it,
when the stage was given the DataModule), so results differ unless each runs where Lightning runs it."""

from __future__ import annotations

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_port.recording import weights

STAGE_HOOKS = [
    f"on_{stage}_{event}"
    for stage in ("validation", "test", "predict")
    for event in ("start", "epoch_start", "batch_start", "batch_end", "epoch_end", "end")
] + ["on_fit_start", "on_fit_end", "on_train_start", "on_train_end", "on_test_model_eval", "on_predict_model_eval"]


def data(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


class Regression(L.LightningModule):
    def __init__(self, calls: list):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.calls = calls
        for hook in STAGE_HOOKS:
            setattr(self, hook, self._recorder(hook, getattr(self, hook)))

    def _recorder(self, hook, original):
        def record(*args, **kwargs):
            self.calls.append(f"{hook}/{len(args)}")  # how many arguments: dataloader_idx is given with several loaders
            return original(*args, **kwargs)

        return record

    def setup(self, stage):
        self.calls.append(f"module.setup({getattr(stage, 'value', stage)})")

    def teardown(self, stage):
        self.calls.append(f"module.teardown({getattr(stage, 'value', stage)})")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self.net(x), y))
        self.calls.append(f"test_step grad={torch.is_grad_enabled()} training={self.training}")

    def on_test_epoch_end(self):
        self.log("epoch_end_metric", 3.0)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.net(batch[0]).squeeze(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(f"module.on_before_batch_transfer({dataloader_idx}) on {batch[0].device.type}")
        x, y = batch
        return x, y + 0.25

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.calls.append(f"module.transfer_batch_to_device({dataloader_idx})")
        return [tensor.to(device) * 1.5 if i == 0 else tensor.to(device) for i, tensor in enumerate(batch)]


class Data(L.LightningDataModule):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls
        self.epochs_seen = 0

    def prepare_data(self):
        self.calls.append("datamodule.prepare_data")

    def setup(self, stage):
        self.calls.append(f"datamodule.setup({getattr(stage, 'value', stage)})")

    def teardown(self, stage):
        self.calls.append(f"datamodule.teardown({getattr(stage, 'value', stage)})")

    def train_dataloader(self):  # shuffled under several processes (Lightning's ddp shuffles training data anyway)
        return DataLoader(data(32, 0), batch_size=8, shuffle=self.trainer.world_size > 1)

    def val_dataloader(self):
        return DataLoader(data(16, 1), batch_size=4)

    def test_dataloader(self):
        return DataLoader(data(16, 2), batch_size=4)

    def predict_dataloader(self):
        return DataLoader(data(12, 3), batch_size=4)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.calls.append(f"datamodule.on_after_batch_transfer({dataloader_idx})")
        x, y = batch
        return x - 0.5, y

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen + 1}

    def load_state_dict(self, state):
        self.epochs_seen = state["epochs_seen"]


def experiment(root: str, **trainer_kwargs) -> dict:
    torch.manual_seed(0)
    calls: list[str] = []
    model, datamodule = Regression(calls), Data(calls)
    kwargs = {"default_root_dir": root, "logger": False, "max_epochs": 1, **trainer_kwargs}
    trainer = L.Trainer(**kwargs)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(f"{root}/one_epoch.ckpt")
    after_one = weights(model)
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)
    tested = trainer.test(model, datamodule=datamodule, verbose=False)
    two_loaders = trainer.test(
        model, dataloaders=[DataLoader(data(8, 4), batch_size=4), DataLoader(data(8, 5), batch_size=4)], verbose=False
    )
    predictions = trainer.predict(model, datamodule=datamodule)
    two_predictions = trainer.predict(model, dataloaders=[DataLoader(data(4, 6), batch_size=2)] * 2)
    nothing = trainer.predict(model, datamodule=datamodule, return_predictions=False)

    second = L.Trainer(**kwargs)  # train further, then test the first epoch's checkpoint
    second.fit(model, datamodule=datamodule)
    trained_further = weights(model) != after_one
    tested_from_checkpoint = second.test(
        model, datamodule=datamodule, ckpt_path=f"{root}/one_epoch.ckpt", verbose=False
    )
    resumed = Data([])
    L.Trainer(**{**kwargs, "max_epochs": 2}).fit(Regression([]), datamodule=resumed, ckpt_path=f"{root}/one_epoch.ckpt")
    return {
        "calls": calls,
        "validated": validated,
        "tested": tested,
        "two_loaders": two_loaders,
        "predictions": [p.tolist() for p in predictions],
        "two_predictions": [[p.tolist() for p in loader] for loader in two_predictions],
        "nothing": nothing,
        "trained_further": trained_further,
        "tested_from_checkpoint": tested_from_checkpoint,
        "datamodule_state_restored": resumed.epochs_seen,
        "weights": weights(model),
    }
