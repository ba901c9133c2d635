"""The run's layout: degrees checked before any process starts, ranks mapped to data-parallel ranks."""

from __future__ import annotations

import pytest

from shardtrain import Engine
from shardtrain.errors import ConfigError, StrategyError
from shardtrain.parallel.dims import ParallelDims
from shardtrain.strategies import FSDPStrategy


def test_degrees_whose_product_is_not_the_world_size_are_refused_naming_the_numbers() -> None:
    with pytest.raises(ConfigError, match=r"dp_replicate=2 x dp_shard=3 .* make 6 ranks, but the run has 4"):
        ParallelDims(world_size=4, dp_replicate=2, dp_shard=3)
    with pytest.raises(ConfigError, match=r"6 is not a multiple of 4"):
        ParallelDims(world_size=6, tp=4)


@pytest.mark.parametrize("degree", ["tp", "pp", "cp", "dp_replicate"])
def test_a_degree_of_zero_is_refused(degree: str) -> None:
    with pytest.raises(ConfigError, match=rf"{degree} must be a whole number >= 1, got 0"):
        ParallelDims(world_size=4, **{degree: 0})


def test_dp_shard_takes_what_the_other_degrees_leave() -> None:
    dims = ParallelDims(world_size=16, pp=2, tp=2)
    assert (dims.dp_shard, dims.data_parallel_size) == (4, 4)
    assert dims.mesh_dims() == {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 2}


def test_ranks_of_one_tensor_parallel_group_read_the_same_batch() -> None:
    dims = ParallelDims(world_size=8, dp_replicate=2, dp_shard=1, tp=2, pp=2)
    # Row-major over (pp, dp_replicate, dp_shard, cp, tp): tp innermost.
    assert [dims.coordinates(rank)["tp"] for rank in range(4)] == [0, 1, 0, 1]
    assert [dims.data_parallel_rank(rank) for rank in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [dims.coordinates(rank)["pp"] for rank in (0, 3, 4, 7)] == [0, 0, 1, 1]


def test_the_engine_takes_the_strategys_layout_before_any_process_starts() -> None:
    hybrid = Engine(
        accelerator="cpu", devices=4, strategy=FSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 2))
    )
    assert (hybrid.parallel_dims.dp_replicate, hybrid.parallel_dims.dp_shard) == (2, 2)
    assert (hybrid.data_parallel_size, hybrid.data_parallel_rank) == (4, 0)
    assert Engine(accelerator="cpu", devices=4, strategy="fsdp").parallel_dims.dp_shard == 4
    assert Engine(accelerator="cpu", devices=4, strategy="ddp").parallel_dims.dp_replicate == 4
    no_shard = Engine(accelerator="cpu", devices=2, strategy=FSDPStrategy(sharding_strategy="NO_SHARD")).parallel_dims
    assert (no_shard.dp_replicate, no_shard.dp_shard) == (2, 1)


def test_a_hybrid_mesh_of_zero_ranks_is_refused_before_any_process() -> None:
    with pytest.raises(StrategyError, match=r"device_mesh must be \(replicate, shard\) sizes, got \(0, 4\)"):
        Engine(
            accelerator="cpu", devices=4, strategy=FSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(0, 4))
        )
