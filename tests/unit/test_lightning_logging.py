"""self.log's options against Lightning (``tests/lightning_port/logging_options.py``): the rows the loggers get (keys
and values, forked names, weighting, reductions, a torchmetrics metric, epoch-end hooks at the right time), and the
callback and progress-bar metrics; plus the refusals."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import ConfigError, TrainModule, Trainer
from tests.lightning_port import run
from tests.lightning_port.compare import assert_same


def test_logged_rows_and_metrics_match_lightning(tmp_path):
    theirs = run("logging_options", "lightning", tmp_path / "lightning")
    ours = run("logging_options", "shardtrain", tmp_path / "shardtrain", strategy="single")
    assert len(theirs["rows"]) == 17  # 7 in fit, plus a row per validation batch (3 per validation, 3 of them)
    assert_same(ours, theirs)


class LogsIn(TrainModule):
    def __init__(self, where, **options):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.where, self.options = where, options

    def training_step(self, batch, batch_idx):
        if self.where == "training_step":
            self.log("x", 1.0, **self.options)
        return self.net(batch[0]).pow(2).mean()

    def on_train_epoch_start(self):
        if self.where == "on_train_epoch_start":
            self.log("x", 1.0, **self.options)

    def on_fit_start(self):
        if self.where == "on_fit_start":
            self.log("x", 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "where, options, message",
    [
        ("on_fit_start", {}, "in on_fit_start: Lightning does not allow logging there"),
        ("on_train_epoch_start", {"on_step": True}, "on_step=True.*once per epoch"),
        ("training_step", {"on_step": False, "on_epoch": False}, "logs nothing"),
        ("training_step", {"reduce_fx": "median"}, "reduce_fx='median'"),
    ],
)
def test_logging_where_or_how_lightning_refuses_is_an_error_naming_the_fix(tmp_path, where, options, message):
    trainer = Trainer(
        accelerator="cpu", default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False
    )
    with pytest.raises(ConfigError, match=message):
        trainer.fit(LogsIn(where, **options), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4))
