"""CSV logger files and the metric reduction done at logging time."""

import csv

import torch

from shardtrain import CSVLogger
from shardtrain.trainer.metrics import Results, reduce_entries


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


def _logged(value, **options):
    from shardtrain.logged import LoggedValue

    return LoggedValue(value=torch.tensor(value), **options)


def test_epoch_values_are_means_weighted_by_batch_size_and_step_values_the_latest():
    results = Results()
    for value, size in ((1.0, 4), (2.0, 4), (6.0, 2)):  # a short last batch
        results.add({"loss": _logged(value, on_step=True, on_epoch=True, prog_bar=True)}, torch.zeros(size, 3))
    step = results.take_step_entries(torch.device("cpu"))
    epoch = results.epoch_entries(torch.device("cpu"))
    values = reduce_entries(step + epoch, lambda tensor, op: tensor)
    assert values == {"loss_step": 6.0, "loss_epoch": (1.0 * 4 + 2.0 * 4 + 6.0 * 2) / 10}
    assert {entry.base_name for entry in step + epoch} == {"loss"} and all(entry.prog_bar for entry in step + epoch)
    assert not results  # both taken


def test_reductions_and_what_is_synced_in_one_collective_per_kind():
    results = Results()
    for value in (3.0, 1.0, 2.0):
        results.add(
            {
                "peak": _logged(value, on_step=False, on_epoch=True, reduce_fx="max", sync_dist=True),
                "total": _logged(value, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True),
                "own": _logged(value, on_step=False, on_epoch=True),
            },
            torch.zeros(1),
        )
    calls = []

    def all_reduce(tensor, op):
        calls.append((op, tensor.numel()))
        return tensor * 10  # stands in for the other ranks

    values = reduce_entries(results.epoch_entries(torch.device("cpu")), all_reduce)
    assert values == {"peak": 30.0, "total": 60.0, "own": 2.0}  # "own" (not synced): this rank's mean
    assert sorted(calls) == [("max", 1), ("sum", 1)]
