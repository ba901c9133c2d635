"""save_hyperparameters / hparams / load_from_checkpoint against Lightning (``tests/lightning_port/hparams.py``), and
what shardtrain does differently on purpose: hyperparameters JSON cannot hold are left out, named, and asked for."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import ConfigError, TrainModule, Trainer
from tests.lightning_port import run
from tests.lightning_port.compare import assert_same


def test_hyperparameters_and_load_from_checkpoint_match_lightning(tmp_path):
    theirs = run("hparams", "lightning", tmp_path / "lightning")
    ours = run("hparams", "shardtrain", tmp_path / "shardtrain", strategy="single")
    assert theirs["restored_weights_equal"] and theirs["overridden_lr"] == 0.5
    assert_same(ours, theirs)


class WithFunction(TrainModule):
    def __init__(self, width: int = 3, init=torch.nn.init.zeros_):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, width)
        init(self.net.weight)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_hyperparameter_json_cannot_hold_is_left_out_named_and_asked_for(tmp_path):
    trainer = Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,  # the first save (and its warning) is the test's
    )
    module = WithFunction(width=5)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    with pytest.warns(UserWarning, match=r"\['init'\] are not recorded"):
        path = trainer.save_checkpoint(tmp_path / "ckpt")
    meta = json.loads((path / "meta.json").read_text())
    recorded = meta["state"]["hparams"]["module"]
    assert recorded["hyper_parameters"] == {"width": 5}
    assert (
        "torch" in recorded["hyper_parameters_left_out"]["init"]
        or "function" in recorded["hyper_parameters_left_out"]["init"]
    )
    assert not any(p.name.endswith((".pkl", ".pt")) for p in path.rglob("*"))  # nothing pickled beside DCP's files
    with pytest.raises(ConfigError, match=r"did not record the hyperparameters \['init'\].*init=\.\.\."):
        WithFunction.load_from_checkpoint(path)
    restored = WithFunction.load_from_checkpoint(path, init=torch.nn.init.ones_)
    assert restored.hparams.width == 5
    assert torch.equal(restored.net.weight, module.net.weight)  # the saved weights, not the init's


def test_save_hyperparameters_of_a_name_init_does_not_take_is_an_error():
    class Wrong(TrainModule):
        def __init__(self, a=1):
            super().__init__()
            self.save_hyperparameters("b")

    with pytest.raises(ConfigError, match=r"'b'.*no such argument.*\['a'\]"):
        Wrong()
