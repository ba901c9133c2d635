"""Trainer.validate/test/predict and DataModules against Lightning (the oracle, ``tests/lightning_port/stages.py``),
and the errors of the stages."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import ConfigError, DataModule, TrainModule, Trainer
from tests.lightning_port import run
from tests.lightning_port.compare import assert_same


def test_stages_hooks_results_and_predictions_match_lightning(tmp_path):
    theirs = run("stages", "lightning", tmp_path / "lightning")
    ours = run("stages", "shardtrain", tmp_path / "shardtrain", strategy="single")
    assert theirs["trained_further"] and theirs["nothing"] is None
    assert_same(ours, theirs)


class Regression(TrainModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        self.log("not_here", 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    x = torch.randn(8, 4)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp_path):
    return Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_steps=1)


def test_test_without_a_model_or_loader_or_best_checkpoint_says_what_to_pass(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(ConfigError, match=r"no model.*trainer.test\(model"):
        trainer.test()
    with pytest.raises(ConfigError, match="no test dataloader.*Regression.test_dataloader"):
        trainer.test(Regression())
    with pytest.raises(ConfigError, match="no best checkpoint"):
        trainer.test(Regression(), _loader(), ckpt_path="best")


def test_last_before_any_checkpoint_warns_and_tests_the_current_weights_as_lightning(tmp_path):
    trainer, model, loader = _trainer(tmp_path), Regression(), _loader()
    with pytest.warns(UserWarning, match='ckpt_path="last".*no checkpoint.*current weights'):
        from_last = trainer.test(model, loader, ckpt_path="last", verbose=False)
    assert trainer.loaded_checkpoint is None
    assert from_last == trainer.test(model, loader, verbose=False)
    assert set(from_last[0]) == {"test_loss"}


def test_loaders_and_a_datamodule_together_are_refused(tmp_path):
    class Data(DataModule):
        def test_dataloader(self):
            return _loader()

    with pytest.raises(ConfigError, match="both dataloaders and a datamodule"):
        _trainer(tmp_path).test(Regression(), _loader(), datamodule=Data())
    with pytest.raises(ConfigError, match="two DataModules"):
        _trainer(tmp_path).fit(Regression(), Data(), datamodule=Data())


def test_logging_in_predict_is_refused_as_in_lightning(tmp_path):
    with pytest.raises(ConfigError, match="self.log.*predict"):
        _trainer(tmp_path).predict(Regression(), _loader())


def test_a_step_without_dataloader_idx_over_several_loaders_is_told_to_take_it(tmp_path):
    with pytest.raises(ConfigError, match=r"several dataloaders.*dataloader_idx"):
        _trainer(tmp_path).test(Regression(), [_loader(), _loader()])


class Validated(Regression):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):  # large enough that the loss goes up again: the best is not the last
        return torch.optim.SGD(self.parameters(), lr=0.6)


def test_best_loads_the_best_checkpoint_of_the_first_model_checkpoint_and_is_the_default_without_a_model(tmp_path):
    from shardtrain.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(monitor="val_loss", save_top_k=1)
    trainer = Trainer(
        accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False, max_epochs=4,
        callbacks=[checkpoint],
    )  # fmt: skip
    torch.manual_seed(0)
    model, loader = Validated(), _loader()
    trainer.fit(model, loader, loader)
    final = trainer.test(model, loader, verbose=False)
    best = trainer._best_checkpoint()
    assert best is not None and best == checkpoint.best_model_path
    from_best = trainer.test(model, loader, ckpt_path="best", verbose=False)
    assert str(trainer.loaded_checkpoint) == best and from_best != final
    assert (
        trainer.test(dataloaders=loader, verbose=False) == from_best
    )  # Lightning: no model after fit tests the best checkpoint
    assert str(trainer.loaded_checkpoint) == best
    fresh = Trainer(accelerator="cpu", default_root_dir=tmp_path / "fresh", logger=False, enable_progress_bar=False)
    assert fresh.test(Validated(), loader, ckpt_path=best, verbose=False) == from_best


def test_a_batch_transfer_hook_in_both_runs_the_datamodules_with_a_warning_as_lightning(tmp_path):
    seen = []

    class Moving(DataModule):
        def test_dataloader(self):
            return _loader()

        def on_after_batch_transfer(self, batch, dataloader_idx):
            seen.append(("datamodule", dataloader_idx))
            return batch

    class Module(Regression):
        def predict_step(self, batch, batch_idx):
            return None

        def on_after_batch_transfer(self, batch, dataloader_idx):
            seen.append(("module", dataloader_idx))
            return batch

    with pytest.warns(UserWarning, match="on_after_batch_transfer is overridden in both Module and Moving"):
        _trainer(tmp_path).test(Module(), datamodule=Moving(), verbose=False)
    assert seen == [("datamodule", 0), ("datamodule", 0)]  # 8 samples in batches of 4


def test_from_datasets_makes_the_loaders_lightning_makes(tmp_path):
    import lightning.pytorch as L
    from torch.utils.data import RandomSampler

    class Sized(DataModule):
        def __init__(self, batch_size, note="x"):
            super().__init__()
            self.note = note

    def shape(datamodule):
        def one(loader):
            return loader.batch_size, loader.num_workers, isinstance(loader.sampler, RandomSampler), len(loader)

        return {
            "train": one(datamodule.train_dataloader()),
            "val": [one(loader) for loader in datamodule.val_dataloader()],
            "test": one(datamodule.test_dataloader()),
        }

    train, val = TensorDataset(torch.randn(10, 2)), [TensorDataset(torch.randn(6, 2))] * 2
    ours = Sized.from_datasets(train, val, test_dataset=train, batch_size=3, note="y")
    theirs = L.LightningDataModule.from_datasets(train, val, test_dataset=train, batch_size=3)
    assert shape(ours) == shape(theirs)
    assert ours.note == "y" and ours.predict_dataloader() is None  # no predict data (Lightning's base raises)
    with pytest.raises(TypeError):
        Sized.from_datasets(train, batch_size=3, unknown=1)
    data = _loader().dataset
    from_datasets = _trainer(tmp_path).test(
        Regression(), datamodule=DataModule.from_datasets(test_dataset=data, batch_size=4), verbose=False
    )
    assert set(from_datasets[0]) == {"test_loss"}
