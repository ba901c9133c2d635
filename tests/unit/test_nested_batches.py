"""Every walk over a nested batch (or state) treats namedtuples like tuples: one traversal, torch's pytree."""

from collections import namedtuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from shardtrain import Precision, Trainer, TrainModule
from shardtrain.callbacks.progress import batch_size_and_tokens
from shardtrain.checkpoint.sharded import _copy_to_host, _flatten
from shardtrain.data import move_to_device

Pair = namedtuple("Pair", ["inputs", "targets"])


def _batch() -> dict:
    return {"pair": Pair(torch.randn(4, 3), torch.arange(4)), "ids": [torch.zeros(4, 8, dtype=torch.long)], "name": "x"}


def test_bf16_true_casts_floating_inputs_inside_a_namedtuple():
    converted = Precision("bf16-true").convert_input(_batch())
    assert isinstance(converted["pair"], Pair)
    assert converted["pair"].inputs.dtype == torch.bfloat16
    assert converted["pair"].targets.dtype == torch.long  # integers are left alone
    assert converted["name"] == "x"
    back = Precision("bf16-true").convert_output(converted)
    assert back["pair"].inputs.dtype == torch.float32


def test_moving_a_batch_keeps_its_types():
    moved = move_to_device(_batch(), torch.device("meta"))
    assert isinstance(moved["pair"], Pair) and moved["pair"].inputs.is_meta and moved["ids"][0].is_meta
    assert moved["name"] == "x"


def test_samples_and_tokens_are_read_through_namedtuples():
    assert batch_size_and_tokens(_batch()) == (4, 32)
    assert batch_size_and_tokens(Pair(torch.randn(5, 2), torch.zeros(5, 7, dtype=torch.long))) == (5, 35)


def test_checkpoint_trees_are_copied_and_named_through_every_container():
    tree = {"model": {"w": torch.ones(2)}, "opt": [Pair(torch.zeros(1), None)], "step": 3}
    copied = _copy_to_host(tree)
    assert copied["model"]["w"] is not tree["model"]["w"] and torch.equal(copied["model"]["w"], tree["model"]["w"])
    assert copied["step"] == 3
    assert sorted(_flatten(tree)) == ["model.w", "opt.0.inputs"]


class NamedTupleRegression(TrainModule):
    def configure_model(self) -> None:
        self.net = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        assert batch.inputs.dtype == torch.bfloat16, "bf16-true must cast inputs in a namedtuple batch"
        return nn.functional.mse_loss(self.net(batch.inputs), batch.targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bf16_true_training_step_receives_bf16_namedtuple_inputs(tmp_path):
    data = [Pair(torch.randn(3), torch.randn(1)) for _ in range(8)]
    trainer = Trainer(accelerator="cpu", precision="bf16-true", max_steps=2, default_root_dir=tmp_path, logger=False)
    trainer.fit(NamedTupleRegression(), DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
