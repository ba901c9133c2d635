"""Lightning's data and layer arguments on 2 processes (AREA=args): ``tests/lightning_port/args_ddp.py`` under Lightning's
ddp as written and under shardtrain's ddp ported by its imports; each rank's batches, weights and BatchNorm statistics
must match."""

from __future__ import annotations

import pytest

from tests.distributed.test_lightning_port import run_port


def _same(ours, theirs, what):
    for rank in range(2):
        assert ours[rank]["batches"] == theirs[rank]["batches"], (what, rank)
        assert ours[rank]["layers"] == theirs[rank]["layers"], (what, rank)
        for key in ("weights", "stats"):
            for name, values in theirs[rank][key].items():
                assert ours[rank][key][name] == pytest.approx(values, abs=1e-5), (what, rank, name)


@pytest.mark.fast
def test_shuffled_training_data_matches_lightnings_ddp(tmp_path):
    """A loader made with shuffle=False is shuffled per rank as Lightning's DistributedSampler does (seed 0,
    PL_GLOBAL_SEED): each rank's batches, weights and BatchNorm statistics are Lightning's.
    (sync_batchnorm is not compared here: torch's DDP refuses SyncBatchNorm on CPU, and these runs are on CPU.)"""
    theirs = run_port(tmp_path / "lightning", "args_ddp", "lightning", "ddp")
    ours = run_port(tmp_path / "ddp", "args_ddp", "shardtrain", "ddp")
    _same(ours, theirs, "shuffled")
    assert theirs[0]["batches"] != theirs[1]["batches"]


def test_use_distributed_sampler_false_keeps_each_ranks_loader(tmp_path):
    theirs = run_port(tmp_path / "lightning", "args_ddp", "lightning", "ddp", use_distributed_sampler=False)
    ours = run_port(tmp_path / "ddp", "args_ddp", "shardtrain", "ddp", use_distributed_sampler=False)
    _same(ours, theirs, "use_distributed_sampler=False")
    assert theirs[0]["batches"] == theirs[1]["batches"]  # every rank reads the whole loader, in order
