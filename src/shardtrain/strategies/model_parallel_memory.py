"""The memory formula of ``ModelParallelStrategy``: FSDP's, over one tensor-parallel rank's share.

Tensor parallelism splits what a plan names among the ``tp`` ranks of a group; the estimate
measures that share on the meta device (``ModelFootprint.tensor_parallel``: parameters, optimizer
state and the activations of the narrowed model, see ``tp_share``). FSDP then shards the share
over the ``dp`` data-parallel ranks exactly as ``fsdp_memory`` shards a whole model over all
ranks: each device holds ``1/dp`` of the share's states, gathers two of its units while they run
(none when ``dp`` is 1), and keeps its own activations.
"""

from __future__ import annotations

from dataclasses import replace

from shardtrain.memory import ModelFootprint, StrategyMemory
from shardtrain.strategies.fsdp_memory import fsdp_memory


def model_parallel_memory(
    footprint: ModelFootprint, *, tensor_parallel_size: int, cpu_offload: bool = False, name: str = "model_parallel"
) -> StrategyMemory | None:
    """Per-device bytes at ``tensor_parallel_size`` (data parallelism: the rest of the run's ranks);
    ``None`` when the footprint has no share measured at that degree."""
    share = footprint.tensor_parallel
    if share is None or share.tensor_parallel_size != tensor_parallel_size:
        return None
    data_parallel = footprint.world_size // tensor_parallel_size
    # FULL_SHARD over the data-parallel ranks: the formula's "all ranks" are those.
    return fsdp_memory(replace(share, devices=data_parallel, num_nodes=1), cpu_offload=cpu_offload, name=name)
