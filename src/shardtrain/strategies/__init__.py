"""Strategies: how a model and its optimizer are placed on the devices of a run."""

from shardtrain.strategies.base import Strategy
from shardtrain.strategies.ddp import DDPStrategy
from shardtrain.strategies.fsdp import FSDPStrategy
from shardtrain.strategies.registry import available_strategies, create_strategy, register_strategy
from shardtrain.strategies.single import SingleDeviceStrategy

register_strategy("single", SingleDeviceStrategy, "one process, one device")
register_strategy("ddp", DDPStrategy, "data parallel: full replica per rank, gradients all-reduced")
register_strategy("fsdp", FSDPStrategy, "FSDP2: parameters, gradients and optimizer state sharded over ranks")
register_strategy("fsdp_cpu_offload", FSDPStrategy, "FSDP2 with parameters, gradients and optimizer state in CPU memory", cpu_offload=True)

__all__ = ["Strategy", "SingleDeviceStrategy", "DDPStrategy", "FSDPStrategy", "available_strategies", "create_strategy", "register_strategy"]
