"""Strategies: how a model and its optimizer are placed on the devices of a run."""

from shardtrain.strategies.base import Strategy
from shardtrain.strategies.ddp import DDPStrategy
from shardtrain.strategies.deepspeed import DeepSpeedStrategy
from shardtrain.strategies.fsdp import FSDPStrategy
from shardtrain.strategies.registry import available_strategies, create_strategy, register_strategy
from shardtrain.strategies.single import SingleDeviceStrategy

register_strategy("single", SingleDeviceStrategy, "one process, one device")
register_strategy("ddp", DDPStrategy, "data parallel: full replica per rank, gradients all-reduced")
register_strategy("fsdp", FSDPStrategy, "FSDP2: parameters, gradients and optimizer state sharded over ranks")
register_strategy(
    "fsdp_cpu_offload",
    FSDPStrategy,
    "FSDP2 with parameters, gradients and optimizer state in CPU memory",
    cpu_offload=True,
)
register_strategy(
    "deepspeed",
    DeepSpeedStrategy,
    "DeepSpeed ZeRO (stage 2 unless set): optimizer state, gradients and parameters partitioned",
)
register_strategy("deepspeed_stage_1", DeepSpeedStrategy, "DeepSpeed ZeRO-1: optimizer state partitioned", stage=1)
register_strategy(
    "deepspeed_stage_2", DeepSpeedStrategy, "DeepSpeed ZeRO-2: optimizer state and gradients partitioned", stage=2
)
register_strategy(
    "deepspeed_stage_2_offload",
    DeepSpeedStrategy,
    "DeepSpeed ZeRO-2, optimizer state in CPU memory",
    stage=2,
    offload_optimizer=True,
)
register_strategy("deepspeed_stage_3", DeepSpeedStrategy, "DeepSpeed ZeRO-3: parameters partitioned too", stage=3)
register_strategy(
    "deepspeed_stage_3_offload",
    DeepSpeedStrategy,
    "DeepSpeed ZeRO-3, parameters and optimizer state in CPU memory",
    stage=3,
    offload_optimizer=True,
    offload_parameters=True,
)
register_strategy(
    "deepspeed_stage_3_offload_nvme",
    DeepSpeedStrategy,
    "DeepSpeed ZeRO-3, parameters and optimizer state on disk (needs nvme_path)",
    stage=3,
    offload_optimizer=True,
    offload_parameters=True,
    offload_optimizer_device="nvme",
    offload_params_device="nvme",
)

__all__ = [
    "Strategy",
    "SingleDeviceStrategy",
    "DDPStrategy",
    "DeepSpeedStrategy",
    "FSDPStrategy",
    "available_strategies",
    "create_strategy",
    "register_strategy",
]
