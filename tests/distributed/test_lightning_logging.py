"""self.log across 2 processes: Lightning's ddp (the oracle) and shardtrain's ddp, fsdp and deepspeed on the same module: each
rank's own values where sync_dist is not set (rank 0's reach the loggers), values reduced over ranks where it is,
epoch means weighted by every rank's batch sizes."""

from __future__ import annotations

from tests.distributed.test_lightning_port import run_port
from tests.lightning_port.compare import assert_same


def test_logging_on_two_processes_matches_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "logging_options", "lightning", "ddp")
    for strategy in ("ddp", "fsdp", "deepspeed"):
        ours = run_port(tmp_path / strategy, "logging_options", "shardtrain", strategy)
        assert_same(ours[0], theirs[0])  # rank 0: what the loggers got
        assert_same(ours[1]["callback_metrics"], theirs[1]["callback_metrics"])
