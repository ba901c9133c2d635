"""Numerical precision of a run: what ``precision="bf16-mixed"`` and friends mean, exactly.

=============  ====================  ===================  ============================================
precision      parameters (master)   forward compute      notes
=============  ====================  ===================  ============================================
``32-true``    fp32                  fp32                 the default
``bf16-mixed`` fp32                  bf16 (autocast)      gradients and optimizer state stay fp32
``bf16-true``  bf16                  bf16                 everything bf16: half the memory, less exact
``16-mixed``   fp32                  fp16 (autocast)      loss scaling with ``torch.amp.GradScaler``
=============  ====================  ===================  ============================================

Sharding strategies may implement the same meaning their own way (FSDP uses its
``MixedPrecisionPolicy`` instead of autocast); the table above is the contract.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Literal, get_args

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from shardtrain.errors import ConfigError

PrecisionName = Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"]
_ALIASES = {"32": "32-true", 32: "32-true", "fp32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", 16: "16-mixed"}


class Precision:
    """One of the precision settings in the table above, bound to a device type."""

    def __init__(self, name: str | int = "32-true") -> None:
        resolved = _ALIASES.get(name, name)
        if resolved not in get_args(PrecisionName):
            raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(get_args(PrecisionName))}")
        self.name: PrecisionName = resolved  # type: ignore[assignment]
        self._scaler: torch.amp.GradScaler | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"32-true": torch.float32, "16-mixed": torch.float16}.get(self.name, torch.bfloat16)

    @property
    def parameter_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16-true" else torch.float32

    @property
    def is_mixed(self) -> bool:
        return self.name.endswith("-mixed")

    def forward_context(self, device_type: str) -> contextlib.AbstractContextManager:
        """Autocast for the mixed settings; nothing otherwise."""
        if not self.is_mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)

    @contextlib.contextmanager
    def module_init_context(self) -> Iterator[None]:
        """Create parameters directly in the parameter dtype (bf16 for ``bf16-true``)."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.parameter_dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)

    def convert_input(self, data: Any) -> Any:
        """Floating-point inputs in the parameter dtype (``bf16-true`` only: autocast handles the mixed settings)."""
        if self.name != "bf16-true":
            return data
        return _map_floating(data, lambda t: t.to(self.parameter_dtype))

    def convert_output(self, data: Any) -> Any:
        """Floating-point outputs back in fp32 for ``bf16-true``, so losses and metrics are reduced in fp32."""
        if self.name != "bf16-true":
            return data
        return _map_floating(data, lambda t: t.to(torch.float32))

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(self.parameter_dtype) if self.name == "bf16-true" else module

    # Loss scaling, used by 16-mixed only.
    def grad_scaler(self, device_type: str) -> torch.amp.GradScaler | None:
        if self.name == "16-mixed" and self._scaler is None:
            self._scaler = torch.amp.GradScaler(device_type)
        return self._scaler

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self._scaler.scale(loss) if self._scaler is not None else loss

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._scaler is None:
            optimizer.step()
        else:
            self._scaler.step(optimizer)

    def update(self) -> None:
        """Called once per optimizer step, after every optimizer has stepped."""
        if self._scaler is not None:
            self._scaler.update()


def _map_floating(data: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``function`` applied to every floating-point tensor in a nested batch (dicts, lists, tuples, namedtuples)."""
    return tree_map_only(torch.Tensor, lambda t: function(t) if t.is_floating_point() else t, data)
