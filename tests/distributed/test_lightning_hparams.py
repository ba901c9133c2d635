"""load_from_checkpoint of checkpoints that 2 processes saved (ddp, fsdp: sharded), against Lightning's ddp on the
same module: the same hyperparameters, logged hyperparameters and restored weights on every rank."""

from __future__ import annotations

from tests.distributed.test_lightning_port import run_port
from tests.lightning_port.compare import assert_same


def test_hparams_and_load_from_checkpoint_on_two_processes_match_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "hparams", "lightning", "ddp")
    assert all(rank["restored_weights_equal"] for rank in theirs)
    for strategy in ("ddp", "fsdp"):
        ours = run_port(tmp_path / strategy, "hparams", "shardtrain", strategy)
        for rank in range(2):
            assert_same(ours[rank], theirs[rank])
