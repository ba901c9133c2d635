"""One process, one device: plain PyTorch."""

from __future__ import annotations

from shardtrain.errors import StrategyError
from shardtrain.strategies.base import Strategy


class SingleDeviceStrategy(Strategy):
    """Train on one device in one process."""

    name = "single"

    def validate(self, world_size: int, device_type: str) -> None:
        if world_size != 1:
            raise StrategyError(
                f"strategy 'single' runs one process, but {world_size} were asked for; use strategy='ddp' or devices=1"
            )
