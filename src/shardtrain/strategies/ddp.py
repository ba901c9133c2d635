"""Data parallel: every rank holds the whole model; gradients are averaged with all-reduce.

The right choice while the model, its gradients and optimizer state fit on one device (below
roughly 500M parameters on common GPUs): it is the fastest strategy and the simplest.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardtrain.memory import ModelFootprint, StrategyMemory
from shardtrain.strategies.base import Strategy
from shardtrain.strategies.capabilities import BackwardSyncControl, DistributedCheckpointState, ReplicatedGradients
from shardtrain.strategies.registry import register_strategy


class DDPStrategy(ReplicatedGradients, DistributedCheckpointState, BackwardSyncControl, Strategy):
    """PyTorch ``DistributedDataParallel``.

    Args:
        find_unused_parameters: set when some parameters get no gradient in a step (costs speed).
        gradient_as_bucket_view: let gradients alias the all-reduce buckets (saves one copy of the
            gradients in memory); on by default.
        static_graph: the set of used parameters never changes between steps (allows optimisations).
        **ddp_kwargs: any other ``DistributedDataParallel`` argument, passed through.
    """

    supports_inference_mode = True

    name = "ddp"
    #: Where ``**ddp_kwargs`` go: config checks accept that signature's options.
    passthrough_options_of = DistributedDataParallel.__init__

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = True,
        static_graph: bool = False,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__()
        self.ddp_kwargs = dict(
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=gradient_as_bucket_view,
            static_graph=static_graph,
            **ddp_kwargs,
        )

    def setup_module(self, module: nn.Module) -> nn.Module:
        module = self.place_module(module)
        if self.world_size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        if enabled and isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def estimate_memory(self, footprint: ModelFootprint) -> StrategyMemory | None:
        """A whole replica per device; ``None`` for one process (``single`` is that row)."""
        return replica_memory(footprint, name=self.name) if footprint.world_size > 1 else None

    def __repr__(self) -> str:
        return f"DDPStrategy({', '.join(f'{k}={v!r}' for k, v in self.ddp_kwargs.items())})"


def replica_memory(footprint: ModelFootprint, *, name: str = "ddp") -> StrategyMemory:
    """Per-device bytes when each device holds the whole model (``single`` and ``ddp``): all parameters,
    gradients and optimizer state, and its own activations; nothing gathered or offloaded. The row is
    labelled ``name``."""
    return StrategyMemory(
        strategy=name,
        parameters=footprint.parameter_bytes,
        gradients=footprint.gradient_bytes,
        optimizer=footprint.optimizer_bytes,
        activations=footprint.activation_bytes,
        working=0,
    )


register_strategy("ddp", DDPStrategy, "data parallel: full replica per rank, gradients all-reduced", auto_priority=110)
