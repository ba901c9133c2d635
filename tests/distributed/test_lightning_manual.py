"""Manual optimization on 2 processes: the oracle GAN (two optimizers, several backward calls per step, toggling,
clipping) under Lightning's ddp as written and under shardtrain's ddp and fsdp ported; a one-optimizer module
under shardtrain's deepspeed (ZeRO-2) against Lightning's ddp."""

from __future__ import annotations

import importlib.util

import pytest

from tests.distributed.test_lightning_port import run_port


def assert_same_training(ours, theirs, label):
    for rank in range(2):
        assert ours[rank]["global_step"] == theirs[rank]["global_step"], label
        assert ours[rank]["lrs"] == pytest.approx(theirs[rank]["lrs"]), label
        for name, values in theirs[rank]["weights"].items():
            assert ours[rank]["weights"][name] == pytest.approx(values, abs=1e-5), (label, rank, name)


def test_manual_gan_under_ddp_and_fsdp_matches_lightnings_ddp(tmp_path):
    # Lightning's DDP needs find_unused_parameters for a GAN (each backward reaches part of the model); shardtrain's
    # averages gradients at the optimizer step instead and needs nothing
    theirs = run_port(tmp_path / "lightning", "manual_gan", "lightning", "ddp_find_unused_parameters_true")
    assert theirs[0]["global_step"] == 8  # two optimizer steps per batch, 2 batches per rank, 2 epochs
    for strategy in ("ddp", "fsdp"):
        ours = run_port(tmp_path / strategy, "manual_gan", "shardtrain", strategy)
        assert_same_training(ours, theirs, strategy)
        assert ours[0]["calls"] == theirs[0]["calls"], strategy
        assert ours[0]["requires_grad"] == theirs[0]["requires_grad"], strategy  # toggle_optimizer on FSDP's shards


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_manual_one_optimizer_under_deepspeed_matches_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "manual_gan", "lightning", "ddp", model="one")
    ours = run_port(tmp_path / "deepspeed", "manual_gan", "shardtrain", "deepspeed", model="one")
    assert_same_training(ours, theirs, "deepspeed")
