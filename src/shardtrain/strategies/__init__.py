"""Strategies: how a model and its optimizer are placed on the devices of a run.

Each strategy's module registers its own names when imported (``register_strategy`` at its
end); importing this package imports them all, in the order their names are listed.
"""

from shardtrain.strategies.base import Strategy
from shardtrain.strategies.registry import available_strategies, create_strategy, register_strategy
from shardtrain.strategies.single import SingleDeviceStrategy
from shardtrain.strategies.ddp import DDPStrategy
from shardtrain.strategies.fsdp import FSDPStrategy
from shardtrain.strategies.deepspeed import DeepSpeedStrategy
from shardtrain.strategies.model_parallel import ModelParallelStrategy

__all__ = [
    "Strategy",
    "SingleDeviceStrategy",
    "DDPStrategy",
    "DeepSpeedStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
    "available_strategies",
    "create_strategy",
    "register_strategy",
]
