"""fit() and validate() end with every callback's teardown and the engine's, after an exception too."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Callback, SingleDeviceStrategy, Trainer
from tests.unit.linear_module import LinearRegression


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def setup(self, trainer, module, stage):
        self.calls.append(("setup", stage))

    def teardown(self, trainer, module, stage):
        self.calls.append(("teardown", stage, trainer.strategy.teardowns))


class CountingStrategy(SingleDeviceStrategy):
    def __init__(self):
        super().__init__()
        self.teardowns = 0

    def teardown(self):
        self.teardowns += 1


class Regression(LinearRegression):
    def __init__(self, fail_at=None):
        super().__init__()
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise ValueError("bad batch")
        return super().training_step(batch, batch_idx)


def _loader():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


def _trainer(tmp_path, recorder):
    return Trainer(
        accelerator="cpu",
        strategy=CountingStrategy(),
        default_root_dir=tmp_path,
        max_steps=2,
        callbacks=[recorder],
        enable_progress_bar=False,
    )


def test_teardown_once_per_fit_and_validate_and_the_model_stays_readable(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path, recorder)
    module = Regression()
    trainer.fit(module, _loader())
    # the callbacks' teardown runs before the strategy's
    assert recorder.calls == [("setup", "fit"), ("teardown", "fit", 0)]
    assert trainer.strategy.teardowns == 1
    trainer.engine.teardown()  # idempotent
    assert trainer.strategy.teardowns == 1
    saved = trainer.save_checkpoint()  # what runs after fit still works
    assert (saved / ".metadata").is_file()
    (metrics,) = trainer.validate(module, _loader())
    assert metrics["val_loss"] > 0
    assert recorder.calls[-2:] == [("setup", "validate"), ("teardown", "validate", 1)]  # every stage is set up
    assert [call for call in recorder.calls if call[0] == "teardown"] == [
        ("teardown", "fit", 0),
        ("teardown", "validate", 1),
    ]


def test_teardown_after_an_exception_in_fit(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path, recorder)
    with pytest.raises(ValueError, match="bad batch"):
        trainer.fit(Regression(fail_at=1), _loader())
    assert recorder.calls == [("setup", "fit"), ("teardown", "fit", 0)]
    assert trainer.strategy.teardowns == 1


def test_validate_alone_tears_down(tmp_path):
    recorder = Recorder()
    trainer = _trainer(tmp_path, recorder)
    trainer.validate(Regression(), _loader())
    assert recorder.calls == [("setup", "validate"), ("teardown", "validate", 0)]
    assert trainer.strategy.teardowns == 1
