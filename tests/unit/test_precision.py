"""Precision settings do what docs/precision.md says, on the CPU as on a GPU."""

import csv

import pytest
import torch
from torch.utils.data import DataLoader

from shardtrain import Precision, Trainer
from tests.unit.test_trainer_loop import Regression, _data


def _run(tmp_path, precision):
    module = Regression()
    trainer = Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=6,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        seed=3,
        enable_progress_bar=False,
    )
    trainer.fit(module, DataLoader(_data(), batch_size=16))
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))]
    return module, losses


def test_bf16_mixed_keeps_fp32_weights_and_tracks_fp32(tmp_path):
    module, losses = _run(tmp_path / "bf16", "bf16-mixed")
    _, reference = _run(tmp_path / "fp32", "32-true")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert losses == pytest.approx(reference, abs=2e-2)
    assert losses != reference, "autocast should have changed the arithmetic"


def test_bf16_true_makes_bf16_weights(tmp_path):
    module, losses = _run(tmp_path / "bf16", "bf16-true")
    _, reference = _run(tmp_path / "fp32", "32-true")
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert losses == pytest.approx(reference, abs=5e-2)


def test_16_mixed_scales_the_loss(tmp_path):
    module, losses = _run(tmp_path / "fp16", "16-mixed")
    _, reference = _run(tmp_path / "fp32", "32-true")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert module.trainer.engine.precision.grad_scaler("cpu").get_scale() > 1.0
    assert losses == pytest.approx(reference, abs=2e-2)


def test_autocast_dtype_inside_training_step():
    precision = Precision("bf16-mixed")
    with precision.forward_context("cpu"):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with Precision("32-true").forward_context("cpu"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


@pytest.mark.parametrize("alias, name", [(32, "32-true"), ("bf16", "bf16-mixed"), (16, "16-mixed")])
def test_aliases(alias, name):
    assert Precision(alias).name == name
