"""A run resumed into the same default_root_dir appends to metrics.csv after a marker row; a new
column (val_loss) widens the header without losing rows; a fresh run moves an old file aside."""

import csv

import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Trainer
from tests.unit.linear_module import LinearRegression

BATCH = 4


def _data():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def _rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    return reader.fieldnames, rows


def test_resume_in_the_same_root_dir_appends_to_metrics_csv_after_a_marker(tmp_path):
    def fit(max_steps, ckpt_path=None, val_check_interval=None):
        trainer = Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            default_root_dir=tmp_path,
            log_every_n_steps=1,
            seed=3,
            enable_progress_bar=False,
            val_check_interval=val_check_interval,
            limit_val_batches=2,
        )
        trainer.fit(
            LinearRegression(lr=0.05),
            DataLoader(_data(), batch_size=BATCH),
            DataLoader(_data(), batch_size=BATCH),
            ckpt_path=ckpt_path,
        )
        return trainer

    fit(3).save_checkpoint()
    header, first = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in first] == [0, 1, 2] and "val_loss" not in header
    fit(6, ckpt_path="last", val_check_interval=2)  # val_loss first appears in the resumed run
    header, rows = _rows(tmp_path / "metrics.csv")
    assert header[0] == "step" and {"train_loss", "epoch", "val_loss", "resumed_from_step"} <= set(header)
    assert [{k: r[k] for k in first[0]} for r in rows[:3]] == first  # the first run's rows, unchanged
    assert rows[3]["resumed_from_step"] == "3" and rows[3]["step"] == "3" and rows[3]["train_loss"] == ""
    assert [int(r["step"]) for r in rows[4:] if r["train_loss"]] == [3, 4, 5]  # Lightning's steps: from 0
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [3, 5]  # every 2 batches of the epoch (at batch 4 and 6)
    assert all(len(r) == len(header) and None not in r for r in rows)  # every row fits the header

    fit(2)  # a fresh run in the same directory: the resumed run's file is moved aside, not overwritten
    assert _rows(tmp_path / "metrics.1.csv")[1] == rows
    assert [int(r["step"]) for r in _rows(tmp_path / "metrics.csv")[1]] == [0, 1]
