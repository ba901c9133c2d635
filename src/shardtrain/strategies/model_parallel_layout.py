"""``ModelParallelStrategy``'s layout: the pipeline, data-parallel and tensor-parallel degrees from its sizes."""

from __future__ import annotations

from typing import Literal

from shardtrain.errors import StrategyError
from shardtrain.parallel_dims import ParallelDims

Size = int | Literal["auto"]


def model_parallel_layout(
    world_size: int, local_world_size: int, *, dp: Size, tp: Size, pp: int, cpu_offload: bool
) -> ParallelDims:
    """``(pp, dp_shard, tp)`` for a run of ``world_size`` ranks (``local_world_size`` per node).

    The pipeline takes ``pp`` groups of ranks; within each, ``"auto"`` sizes resolve as Lightning's
    ``ModelParallelStrategy`` does (tensor parallel over one node's processes, data parallel over the
    nodes) or, with pipeline stages, data parallel over every rank they leave.
    """
    if world_size % pp:
        raise StrategyError(
            f"pipeline_parallel_size={pp} does not divide the {world_size} ranks of the run (devices x num_nodes); "
            f"choose a pipeline_parallel_size that divides {world_size}"
        )
    ranks, local = world_size // pp, max(1, local_world_size // pp)
    where = "the run" if pp == 1 else f"each of the {pp} pipeline stages"
    if tp == "auto" and dp == "auto":
        tp = local if pp == 1 else 1
    elif tp == "auto":
        if ranks % dp:
            raise StrategyError(
                f"data_parallel_size={dp} does not divide the {ranks} ranks of {where} (devices x num_nodes"
                f"{'' if pp == 1 else ' / pipeline_parallel_size'}); choose a data_parallel_size that divides {ranks}"
            )
        tp = ranks // dp
    if ranks % tp:
        raise StrategyError(
            f"tensor_parallel_size={tp} does not divide the {ranks} ranks of {where} (devices x num_nodes"
            f"{'' if pp == 1 else ' / pipeline_parallel_size'}); choose a tensor_parallel_size that divides {ranks}"
        )
    if dp == "auto":
        dp = ranks // tp
    if dp * tp != ranks:
        raise StrategyError(
            f"data_parallel_size={dp} x tensor_parallel_size={tp} = {dp * tp}, but {where} has {ranks} ranks "
            f"(devices x num_nodes{'' if pp == 1 else ' / pipeline_parallel_size'}); choose sizes whose product is {ranks}"
        )
    if cpu_offload and pp > 1:
        raise StrategyError(
            "cpu_offload with pipeline_parallel_size > 1 is not supported yet (FSDP's offload of pipeline stages is "
            "untested); leave cpu_offload out, or use more pipeline stages to fit the model"
        )
    if cpu_offload and dp == 1:
        raise StrategyError(
            "cpu_offload is FSDP's offload, which needs data_parallel_size > 1; with every rank in one "
            f"tensor-parallel group (tensor_parallel_size={tp}) leave it out, or lower tensor_parallel_size"
        )
    return ParallelDims(world_size=world_size, dp_shard=dp, tp=tp, pp=pp)
