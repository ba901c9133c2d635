"""The memory formula of a whole replica per device: ``single`` and ``ddp``.

Every device holds all parameters, gradients and optimizer state, and its own activations;
nothing is gathered or offloaded.
"""

from __future__ import annotations

from shardtrain.memory import ModelFootprint, StrategyMemory


def replica_memory(footprint: ModelFootprint, *, name: str = "ddp") -> StrategyMemory:
    """Per-device bytes when each device holds the whole model; the row is labelled ``name``."""
    return StrategyMemory(
        strategy=name,
        parameters=footprint.parameter_bytes,
        gradients=footprint.gradient_bytes,
        optimizer=footprint.optimizer_bytes,
        activations=footprint.activation_bytes,
        working=0,
    )
