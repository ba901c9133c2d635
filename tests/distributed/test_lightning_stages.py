"""validate/test/predict and a DataModule on 2 processes: Lightning's ddp (the oracle) and shardtrain's ddp, fsdp and
DeepSpeed ZeRO-2 and ZeRO-3 on the same module ported by its imports: each rank's hooks, results, own predictions and
checkpoint-loaded test (under DeepSpeed each stage after fit sets the trained model up in a new engine)."""

from __future__ import annotations

from tests.distributed.test_lightning_port import run_port
from tests.lightning_port.compare import assert_same


def test_stages_on_two_processes_match_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "stages", "lightning", "ddp")
    assert theirs[0]["predictions"] != theirs[1]["predictions"]  # each rank predicts its own share
    for strategy in ("ddp", "fsdp", "deepspeed", "deepspeed_stage_3"):
        ours = run_port(tmp_path / strategy, "stages", "shardtrain", strategy)
        for rank in range(2):  # each rank's own: hooks, results (metrics logged without sync_dist), predictions
            assert_same(ours[rank], theirs[rank])
