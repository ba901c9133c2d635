"""CSV logger files and the metric reduction done at logging time."""

import csv

import torch

from shardtrain import CSVLogger
from shardtrain.trainer.metrics import MetricCollector


def test_csv_logger_widens_header(tmp_path):
    logger = CSVLogger(tmp_path, flush_logs_every_n_steps=2)
    logger.log_metrics({"train_loss": 2.0}, step=1)
    assert not (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").exists()  # buffered until 2 rows
    logger.log_metrics({"train_loss": 1.5}, step=2)
    logger.log_metrics({"train_loss": 1.0, "val_loss": 1.2}, step=3)
    logger.finalize("success")
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [r["train_loss"] for r in rows] == ["2.0", "1.5", "1.0"]
    assert [r["val_loss"] for r in rows] == ["", "", "1.2"]


def test_validation_collector_means_over_batches():
    collector = MetricCollector(mean_over_batches=True)
    for value in (1.0, 2.0, 6.0):
        collector.update({"val_loss": (torch.tensor(value), True)})
    assert collector.compute(lambda t: t, torch.device("cpu")) == {"val_loss": 3.0}
    assert collector.prog_bar == {"val_loss"}


def test_training_collector_keeps_latest():
    collector = MetricCollector(mean_over_batches=False)
    for value in (1.0, 2.0):
        collector.update({"lr": (torch.tensor(value), False)})
    assert collector.compute(lambda t: t, torch.device("cpu")) == {"lr": 2.0}
