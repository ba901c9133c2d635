"""Capabilities a strategy mixes in, as Lightning Fabric's ``_BackwardSyncControl`` and ``_Sharded`` do.

``Strategy`` leaves abstract what no default gets right for every layout; these mixins are the
common answers, so that a strategy states what it is rather than inheriting single-device
behaviour by accident:

- ``ReplicatedGradients``: every rank holds whole gradients (after synchronisation), so the
  local norm is the whole gradient's norm (single device, DDP).
- ``ShardedGradients``: gradients are DTensors (FSDP2); the norm is reduced over the shards.
- ``DistributedCheckpointState``: state dicts keyed by parameter names through
  ``torch.distributed.checkpoint.state_dict``, which understands plain, DDP and FSDP2 modules.
- ``BackwardSyncControl``: the strategy can skip gradient synchronisation while accumulating.
"""

from __future__ import annotations

import abc
import contextlib
import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer


class BackwardSyncControl(abc.ABC):
    """A strategy that can accumulate gradients locally, without synchronising them."""

    @abc.abstractmethod
    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """While ``enabled``, backward passes on ``module`` do not synchronise gradients."""


class ReplicatedGradients:
    """Whole gradients on every rank: the local norm is the norm of the whole gradient."""

    def gradient_norm(self, parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor | None:
        grads = [p.grad for p in parameters if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=True)

    def clip_gradients_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type, foreach=True)


class ShardedGradients:
    """DTensor gradients (FSDP2, tensor parallel): DTensor arithmetic reduces each norm over its mesh.

    Gradients may live on several meshes (under FSDP x TP: the 2-D mesh for parameters the
    tensor-parallel plan split, the 1-D data-parallel mesh for the rest) and may be plain tensors
    (tensor parallel alone: replicated parameters, whole on every rank). torch's norm cannot mix
    them in one call, so each group's norm is taken on its own, made whole (``full_tensor``), and
    the groups combined, as torchtitan does for expert-parallel gradients.
    """

    def gradient_norm(self, parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor | None:
        groups = _by_mesh([p.grad for p in parameters if p.grad is not None])
        norms = [_full(torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=True)) for grads in groups]
        if len(norms) == 1:
            return norms[0]
        if not norms:
            return torch.tensor(0.0)
        stacked = torch.stack([norm.to(norms[0].device) for norm in norms])
        if math.isinf(norm_type):
            return stacked.max()
        return stacked.pow(norm_type).sum().pow(1.0 / norm_type)

    def clip_gradients_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        parameters = [p for p in parameters if p.grad is not None]
        norm = self.gradient_norm(parameters, norm_type)
        assert norm is not None
        for group in _by_mesh(parameters):
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)
        return norm


def _by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by the DTensor mesh they live on (plain tensors together), in first-seen order."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(getattr(tensor, "device_mesh", None), []).append(tensor)
    return list(groups.values())


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class DistributedCheckpointState:
    """State keyed by parameter names through torch's state-dict API (plain, DDP and FSDP2 modules).

    ``full=True`` gathers whole tensors to the CPU; ``full=False`` gives each rank its shards.
    """

    def module_state_dict(self, module: nn.Module, full: bool = True) -> dict[str, Any]:
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=full, cpu_offload=full))

    def load_module_state_dict(
        self, module: nn.Module, state: dict[str, Any], strict: bool = True, full: bool = True
    ) -> None:
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=full, strict=strict))

    def optimizer_state_dict(self, module: nn.Module, optimizer: Optimizer, full: bool = True) -> dict[str, Any]:
        return get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=full, cpu_offload=full)
        )

    def load_optimizer_state_dict(
        self, module: nn.Module, optimizer: Optimizer, state: dict[str, Any], full: bool = True
    ) -> None:
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=full))
