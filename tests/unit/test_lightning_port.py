"""The Lightning oracle in one process: each module of ``tests/lightning_port`` runs under Lightning as written
and under shardtrain ported by its imports only; what they did must match."""

from __future__ import annotations

import pytest

from tests.lightning_port import port_source, run


def test_the_port_changes_imports_and_base_classes_only():
    source = (
        "import lightning.pytorch as L\nfrom lightning.pytorch.callbacks import ModelCheckpoint\n"
        "from pytorch_lightning.loggers import CSVLogger\nclass M(L.LightningModule): ...\n"
        "class D(LightningDataModule): ...\nmy_lightning.pytorch_thing = 1\n"
    )
    assert port_source(source) == (
        "import shardtrain as L\nfrom shardtrain.callbacks import ModelCheckpoint\n"
        "from shardtrain.loggers import CSVLogger\nclass M(L.TrainModule): ...\n"
        "class D(DataModule): ...\nmy_lightning.pytorch_thing = 1\n"
    )


def test_basic_fit_matches_lightning(tmp_path):
    ours = run("basic", "shardtrain", tmp_path / "ours", strategy="single")
    theirs = run("basic", "lightning", tmp_path / "theirs")
    assert ours["calls"] == theirs["calls"]
    assert ours["calls"].count("backward") == 8  # the module's backward hook ran in place of loss.backward()
    assert ours["backward_losses"] == pytest.approx(theirs["backward_losses"], abs=1e-6)
    assert ours["global_step"] == theirs["global_step"] == 8
    for name, values in theirs["weights"].items():
        assert ours["weights"][name] == pytest.approx(values, abs=1e-6)
    their_losses = [row["loss"] for row in theirs["rows"] if "loss" in row]
    our_losses = [row["loss"] for row in ours["rows"] if "loss" in row]
    assert our_losses == pytest.approx(their_losses, abs=1e-6)
