"""``strategy="auto"``: the one place where it is resolved.

Before any process starts, ``auto`` stands for ``ddp`` (several processes) or ``single`` (one),
so that processes can be launched; when the model is set up, ``Engine.choose_strategy`` asks
``choose_for_module``, which estimates the model's memory on the meta device and picks the first
registered auto candidate (``register_strategy(..., auto_priority=N)``, lowest first) whose estimate
fits (``MemoryEstimate.recommend``). With the built-ins alone: DDP while a replica fits, else FSDP,
else tensor parallelism with FSDP where the model has a plan, else FSDP with CPU offload.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from shardtrain.estimate.table import device_memory_bytes, estimate_memory
from shardtrain.launch.environment import ClusterEnvironment
from shardtrain.parallel.materialize import fresh_copy

AUTO = "auto"


def is_auto(strategy: Any) -> bool:
    return isinstance(strategy, str) and strategy.strip().lower() == AUTO


def provisional_strategy(strategy: Any, world_size: int) -> Any:
    """What ``auto`` stands for until the model is known; any other strategy as given."""
    if not is_auto(strategy):
        return strategy
    return "ddp" if world_size > 1 else "single"


def choose_for_module(
    module: nn.Module, environment: ClusterEnvironment, precision: str, device_type: str
) -> tuple[str, str]:
    """The registered strategy name for ``module`` on this run's layout, and why."""
    return choose_strategy(
        module,
        devices=environment.local_world_size,
        num_nodes=max(1, environment.world_size // environment.local_world_size),
        precision=precision,
        device_type=device_type,
    )


def choose_strategy(
    module: nn.Module, *, devices: int, num_nodes: int, precision: str, device_type: str, batch_size: int = 1
) -> tuple[str, str]:
    """``strategy="auto"``: the strategy this run should use, from the estimate and the real memory."""
    estimate = estimate_memory(
        fresh_copy(module), devices=devices, num_nodes=num_nodes, precision=precision, batch_size=batch_size
    )
    device_memory, host_memory = device_memory_bytes(device_type, devices)
    return estimate.recommend(device_memory, host_memory)
