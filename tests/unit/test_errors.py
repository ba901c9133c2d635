"""Bad input gets a clear error that names the fix, before any process starts."""

import pytest
import torch

import shardtrain
from shardtrain import ConfigError, StrategyError, Trainer, TrainingStepError


def test_unknown_strategy_lists_known_names():
    with pytest.raises(StrategyError) as error:
        Trainer(strategy="dpp")
    message = str(error.value)
    assert "unknown strategy 'dpp'" in message
    assert "ddp" in message and "single" in message


def test_strategy_options_that_do_not_belong():
    with pytest.raises(StrategyError, match="does not take these options"):
        shardtrain.strategies.create_strategy("single", bucket_cap_mb=25)


@pytest.mark.parametrize("devices", [0, -1, 1.5, "2"])
def test_devices_must_be_positive_int(devices):
    with pytest.raises(ConfigError, match="devices must be a whole number >= 1"):
        Trainer(devices=devices)


def test_single_strategy_refuses_many_devices():
    with pytest.raises(StrategyError, match="use strategy='ddp'"):
        Trainer(accelerator="cpu", devices=2, strategy="single")


def test_unknown_precision():
    with pytest.raises(ConfigError, match="unknown precision 'fp8'.*bf16-mixed"):
        Trainer(precision="fp8")


def test_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        Trainer(accelerator="cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"max_steps": 0}, "max_steps"),
        ({"gradient_clip_algorithm": "l1"}, "gradient_clip_algorithm"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val"),
        ({"limit_val_batches": 1.5}, "limit_val_batches"),
        ({"val_check_interval": 0}, "val_check_interval"),
        ({"logger": "csv"}, "logger"),
    ],
)
def test_trainer_arguments_are_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Trainer(**kwargs)


class _NoLoss(shardtrain.TrainModule):
    def configure_model(self):
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        self.layer(batch[0]).mean()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _DetachedLoss(_NoLoss):
    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).mean().detach()


def _loader():
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    return torch.utils.data.DataLoader(data, batch_size=4)


def test_training_step_without_loss(tmp_path):
    trainer = Trainer(accelerator="cpu", max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(TrainingStepError, match="return the loss tensor or a dict with a 'loss' tensor"):
        trainer.fit(_NoLoss(), _loader())


def test_training_step_with_detached_loss(tmp_path):
    trainer = Trainer(accelerator="cpu", max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(TrainingStepError, match="does not require grad"):
        trainer.fit(_DetachedLoss(), _loader())


def test_missing_train_dataloader(tmp_path):
    trainer = Trainer(accelerator="cpu", max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="train_dataloader"):
        trainer.fit(_NoLoss())


def test_missing_tensorboard_names_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(shardtrain.MissingDependencyError, match=r"pip install 'shardtrain\[tensorboard\]'"):
        shardtrain.TensorBoardLogger("runs")
