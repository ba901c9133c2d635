"""The memory formula of ``FSDPStrategy``: where FSDP2 keeps the bytes for each ``sharding_strategy``.

Parameters, gradients and optimizer state are split over the ranks that shard them: all ranks
(``FULL_SHARD``, ``SHARD_GRAD_OP``), the ranks of one node (``HYBRID_SHARD``) or none
(``NO_SHARD``, a replica like DDP). While a unit runs, its parameters are gathered whole: the
running unit and the prefetched next one (2U, U the largest unit), or under ``SHARD_GRAD_OP``
every unit's, kept gathered from forward to backward. With ``cpu_offload`` the shards live in
host memory and only the gathered units are on the device. Checked against real 2-rank runs
(``tests/distributed/test_estimate_vs_measured.py``); see docs/memory.md.
"""

from __future__ import annotations

from shardtrain.memory import ModelFootprint, StrategyMemory


def fsdp_memory(
    footprint: ModelFootprint,
    *,
    sharding_strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    shard_ranks: int | None = None,
    name: str = "fsdp",
) -> StrategyMemory:
    """Per-device bytes under FSDP2, the row labelled ``name``.

    ``shard_ranks`` is the shard size of a ``HYBRID_SHARD`` mesh (default: the devices of a node).
    """
    ranks = _shard_ranks(footprint, sharding_strategy, shard_ranks)
    P, G, Opt = footprint.parameter_bytes, footprint.gradient_bytes, footprint.optimizer_bytes
    gathered = 2 * footprint.largest_unit_bytes  # the unit running plus the next one being gathered (prefetch)
    if cpu_offload:
        # Units are copied to the device to run, even on one rank; under SHARD_GRAD_OP all of them stay there.
        working = P if sharding_strategy == "SHARD_GRAD_OP" else gathered
        return StrategyMemory(
            strategy=name,
            parameters=0,
            gradients=0,
            optimizer=0,
            activations=footprint.activation_bytes,
            working=working,
            host_per_device=(P + G + Opt) // ranks,
        )
    if sharding_strategy == "SHARD_GRAD_OP":
        working = P - P // ranks  # the other ranks' parameters, kept gathered between forward and backward
    else:
        working = gathered if ranks > 1 else 0  # one rank holds every parameter already: nothing to gather
    return StrategyMemory(
        strategy=name,
        parameters=P // ranks,
        gradients=G // ranks,
        optimizer=Opt // ranks,
        activations=footprint.activation_bytes,
        working=working,
    )


def _shard_ranks(footprint: ModelFootprint, sharding_strategy: str, shard_ranks: int | None) -> int:
    if sharding_strategy == "NO_SHARD":
        return 1
    if sharding_strategy == "HYBRID_SHARD":
        return shard_ranks or footprint.devices
    return footprint.world_size
