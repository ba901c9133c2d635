"""Steps written without ``batch_idx`` (Lightning's ``training_step(self, batch)``) train and validate."""

import csv

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Trainer
from shardtrain.module import takes_batch_idx
from tests.unit.linear_module import LinearRegression


class WithoutIndex(LinearRegression):
    def training_step(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def _fit_and_validate(tmp_path, module):
    trainer = Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=4,
        log_every_n_steps=1,
        seed=3,
        enable_progress_bar=False,
    )
    trainer.fit(module, DataLoader(_data(32, 0), batch_size=8))
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train_loss")]
    (metrics,) = trainer.validate(module, DataLoader(_data(16, 1), batch_size=4))
    return losses, metrics["val_loss"]


def test_steps_without_batch_idx_match_steps_with_it(tmp_path):
    losses, val_loss = _fit_and_validate(tmp_path / "without", WithoutIndex())
    expected_losses, expected_val_loss = _fit_and_validate(tmp_path / "with", LinearRegression())
    assert len(losses) == 4
    assert losses == pytest.approx(expected_losses, abs=1e-7)
    assert val_loss == pytest.approx(expected_val_loss, abs=1e-7)


def test_which_signatures_take_batch_idx():
    class Steps:
        def plain(self, batch): ...
        def indexed(self, batch, batch_idx): ...
        def renamed(self, batch, idx): ...
        def variadic(self, *args): ...
        def keyword_only(self, batch, *, batch_idx=0): ...
        def optional(self, batch, dataloader_idx=0): ...

    steps = Steps()
    assert not takes_batch_idx(steps.plain)
    assert takes_batch_idx(steps.indexed)
    assert takes_batch_idx(steps.renamed)
    assert takes_batch_idx(steps.variadic)
    assert not takes_batch_idx(steps.keyword_only)  # passed by position, so not to this one
    assert takes_batch_idx(steps.optional)  # two positional parameters, as Lightning counts them
