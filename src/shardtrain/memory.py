"""Memory figures as plain values: sizes as people write them, what a model holds, what one device needs.

A strategy's memory formula (``Strategy.estimate_memory``) takes a ``ModelFootprint`` and returns
a ``StrategyMemory``; ``shardtrain.estimate.footprint`` measures the first, ``shardtrain.estimate`` collects
the second over every registered strategy. This module imports neither torch nor the strategies,
so all of them import it without cycles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardtrain.errors import ConfigError

GIB = 2**30
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory_size(text: str | int) -> int:
    """Bytes in ``"80GiB"``, ``"1TiB"``, ``"512MB"``, ``"5 gib"`` or a number of bytes (units in any case).

    Raises ``ConfigError`` (a ``ValueError``, so argparse reports it as a bad value) for anything else.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in (*_UNITS, ""):
        raise ConfigError(f"cannot read memory size {text!r}; write it like 80GiB, 512MiB, 1TB or a number of bytes")
    return int(float(match.group(1)) * _UNITS.get(match.group(2).lower() or "b"))


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelFootprint:
    """What a model holds for training, whole (not per device), and the run layout it is estimated for.

    Attributes:
        parameters: number of parameters (shared ones counted once).
        trainable_parameters: those with ``requires_grad``.
        parameter_bytes: bytes of the parameters in the run's parameter dtype.
        optimizer_bytes: bytes of optimizer state, as the optimizer itself creates it.
        activation_bytes: bytes saved for backward by one training step (per device).
        largest_unit_bytes: parameter bytes of the largest block (an FSDP unit); the whole model if none.
        precision: the run's precision name, e.g. ``"bf16-mixed"``.
        devices: devices (processes) per node.
        num_nodes: nodes.
        tensor_parallel_size: 1 for a whole model; above 1, the byte figures are one tensor-parallel
            rank's share (``shardtrain.parallel.tensor_parallel.share``).
        tensor_parallel: the same measures of one rank's share, when the estimate is for tensor
            parallelism (``estimate_memory(tensor_parallel_size=...)``); else ``None``.
        trainable_parameter_bytes: bytes of the trainable parameters, which may be stored in another dtype
            than the frozen ones (``frozen_dtype``); ``None``: the average bytes per parameter.
    """

    parameters: int
    trainable_parameters: int
    parameter_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    largest_unit_bytes: int
    precision: str = "32-true"
    devices: int = 1
    num_nodes: int = 1
    tensor_parallel_size: int = 1
    tensor_parallel: ModelFootprint | None = None
    trainable_parameter_bytes: int | None = None

    @property
    def world_size(self) -> int:
        """Ranks in the run: ``devices * num_nodes``."""
        return self.devices * self.num_nodes

    @property
    def gradient_bytes(self) -> int:
        """Bytes of the gradients in the trainable parameters' dtype (trainable parameters only)."""
        if self.trainable_parameter_bytes is not None:
            return self.trainable_parameter_bytes
        return self.parameter_bytes * self.trainable_parameters // max(self.parameters, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategyMemory:
    """Bytes one device (and its host) needs under one strategy."""

    strategy: str
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    working: int  # gathered units and buffers that exist only while a unit runs
    host_per_device: int = 0  # CPU memory per rank, for offloading strategies
    available: bool = True  # False: shown for comparison only, not a strategy name shardtrain accepts

    @property
    def device_total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.working

    def fits(self, device_memory: int, host_memory_per_device: int | None, headroom: float) -> bool:
        host_ok = host_memory_per_device is None or self.host_per_device <= headroom * host_memory_per_device
        return self.device_total <= headroom * device_memory and host_ok
