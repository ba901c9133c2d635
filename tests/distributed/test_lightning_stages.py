"""validate/test/predict and a DataModule on 2 processes: Lightning's ddp (the oracle) and shardtrain's ddp and fsdp
on the same module ported by its imports: each rank's hooks, results, own predictions and checkpoint-loaded test."""

from __future__ import annotations

from tests.distributed.test_lightning_port import run_port
from tests.lightning_port.compare import assert_same


def test_stages_on_two_processes_match_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "stages", "lightning", "ddp")
    assert theirs[0]["predictions"] != theirs[1]["predictions"]  # each rank predicts its own share
    for strategy in ("ddp", "fsdp"):
        ours = run_port(tmp_path / strategy, "stages", "shardtrain", strategy)
        for rank in range(2):
            # Metrics logged without sync_dist are each rank's own in Lightning; how ranks' metrics combine is
            # tests/distributed/test_lightning_logging.py's subject: here, the rest of each rank's records.
            metrics = ("validated", "tested", "two_loaders", "tested_from_checkpoint")
            assert_same(*({k: v for k, v in run[rank].items() if k not in metrics} for run in (ours, theirs)))
