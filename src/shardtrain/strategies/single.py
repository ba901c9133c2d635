"""One process, one device: plain PyTorch."""

from __future__ import annotations

from torch import nn

from shardtrain.errors import StrategyError
from shardtrain.memory import ModelFootprint, StrategyMemory
from shardtrain.strategies.base import Strategy
from shardtrain.strategies.capabilities import DistributedCheckpointState, ReplicatedGradients
from shardtrain.strategies.registry import register_strategy
from shardtrain.strategies.ddp import replica_memory


class SingleDeviceStrategy(ReplicatedGradients, DistributedCheckpointState, Strategy):
    """Train on one device in one process."""

    supports_inference_mode = True

    name = "single"

    def setup_module(self, module: nn.Module) -> nn.Module:
        return self.place_module(module)

    def validate(self, world_size: int, device_type: str) -> None:
        if world_size != 1:
            raise StrategyError(
                f"strategy 'single' runs one process, but {world_size} were asked for; use strategy='ddp' or devices=1"
            )

    def estimate_memory(self, footprint: ModelFootprint) -> StrategyMemory | None:
        """The whole model on the one device; ``None`` for a run of more than one process."""
        return replica_memory(footprint, name=self.name) if footprint.world_size == 1 else None


register_strategy("single", SingleDeviceStrategy, "one process, one device", auto_priority=100)
