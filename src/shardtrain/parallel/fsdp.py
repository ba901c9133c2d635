"""Fully sharded data parallel (PyTorch FSDP2, ``fully_shard``): the one place it is applied.

``apply_fsdp`` is what every strategy that shards calls (``FSDPStrategy``, ``ModelParallelStrategy``
over whole models and over pipeline stages): each unit becomes an FSDP unit, innermost first, then
the root. The root keeps its parameters unsharded from the end of forward to the start of backward,
which needs them at once (FSDP2's own default for a root): no second all-gather per step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(
    root: nn.Module,
    units: Sequence[nn.Module],
    *,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy,
    cpu_offload: bool,
    device: torch.device,
    reshard_after_forward: bool = True,
    compile: dict[str, Any] | None = None,
) -> FSDPModule:
    """Shard each of ``units`` over ``mesh`` (innermost first: a unit nested in another is sharded before
    its parent), then ``root``; returns the root.

    ``reshard_after_forward`` is the units' (False keeps a unit gathered from forward to backward:
    ``SHARD_GRAD_OP``, and pipeline stages, whose micro-batches would each gather it again); the root
    always keeps its parameters. ``compile``: ``torch.compile`` options to compile each unit with (in
    place, so parameter names do not change) just before it is sharded; None: no compile.
    """
    options: dict[str, Any] = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy(cpu_offload, device))
    for unit in reversed(units):
        if compile is not None:
            unit.compile(**compile)
        fully_shard(unit, **options, reshard_after_forward=reshard_after_forward)
    return fully_shard(root, **options, reshard_after_forward=False)


def shard_nested_unit(
    unit: nn.Module, *, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy, cpu_offload: bool, device: torch.device
) -> FSDPModule:
    """One FSDP unit over a mesh of its own (an expert-parallel layer's experts, over the ranks that hold the same
    experts), sharded before the units around it; resharded after its forward like every unit."""
    return fully_shard(unit, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy(cpu_offload, device))


def offload_policy(cpu_offload: bool, device: torch.device) -> OffloadPolicy:
    """Parameters, gradients and optimizer state in CPU memory with ``cpu_offload``. Pinned host memory
    speeds up copies to a GPU; without one there is nothing to pin for."""
    return CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for a precision name: mixed precisions compute in 16 bits, reduce in fp32."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def no_backward_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Accumulate unsharded gradients locally (no reduce-scatter) while ``enabled``; a module that is
    not an FSDP root (tensor parallelism alone) has nothing to skip."""
    return _no_gradient_sync(module, enabled) if isinstance(module, FSDPModule) else contextlib.nullcontext()


@contextlib.contextmanager
def _no_gradient_sync(module: FSDPModule, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
