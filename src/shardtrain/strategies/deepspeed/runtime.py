"""The pieces of DeepSpeed that ``DeepSpeedStrategy`` uses at run time, each a function of its config.

Its precision (DeepSpeed runs the model in the 16-bit dtype itself), materialising a meta-device
model partition by partition (ZeRO-3), DeepSpeed's CPU Adam in place of torch's Adam when the
optimizer state is offloaded, the accumulation boundary, and the check for the async I/O op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from shardtrain.errors import MissingDependencyError
from shardtrain.precision import Precision, _map_floating
from shardtrain.strategies.deepspeed.config import offloads_optimizer
from shardtrain.parallel.materialize import materialize, materialize_in_units
from shardtrain.parallel.policy import repeated_blocks

log = logging.getLogger("shardtrain.strategies.deepspeed")


class DeepSpeedPrecision(Precision):
    """DeepSpeed runs the model in the low-precision dtype itself (bf16/fp16 weights, fp32 master
    copy in the optimizer): no autocast, floating inputs cast to that dtype, outputs back to fp32."""

    def forward_context(self, device_type: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def module_init_context(self) -> Iterator[None]:
        yield  # fp32 at build time: DeepSpeed casts when it takes the model

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module

    def convert_input(self, data: Any) -> Any:
        if self.name == "32-true":
            return data
        return _map_floating(data, lambda t: t.to(self.compute_dtype))

    def convert_output(self, data: Any) -> Any:
        if self.name == "32-true":
            return data
        return _map_floating(data, lambda t: t.float())

    def grad_scaler(self, device_type: str) -> None:
        return None  # DeepSpeed scales fp16 losses itself


def materialize_partitioned(module: nn.Module, device: torch.device, config: dict[str, Any]) -> None:
    """Materialise a meta-device model; under ZeRO-3 one block at a time, each partitioned as it is made."""
    if int(config["zero_optimization"]["stage"]) != 3:
        materialize(module, device)
        return
    import deepspeed

    blocks = repeated_blocks(module)

    swapper = None  # one disk swapper (and its buffers) for all units, not one per unit

    def partition(unit: nn.Module) -> None:
        nonlocal swapper
        swapper = deepspeed.zero.Init(module=unit, config_dict_or_path=config, param_swapper=swapper).param_swapper

    materialize_in_units(module, device, blocks, partition)


def optimizer_for_deepspeed(optimizer: Optimizer | None, config: dict[str, Any]) -> Optimizer | None:
    """With the optimizer state offloaded, DeepSpeed's CPU Adam replaces torch's Adam/AdamW.

    It shares the user optimizer's parameter groups, so LR schedulers built on the user's
    optimizer still drive it.
    """
    if (
        optimizer is None
        or not offloads_optimizer(config)
        or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW)
    ):
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    cpu_adam = DeepSpeedCPUAdam(
        [p for group in optimizer.param_groups for p in group["params"]],
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        adamw_mode=type(optimizer) is torch.optim.AdamW,
    )
    for group in optimizer.param_groups:
        for key, value in cpu_adam.defaults.items():
            group.setdefault(key, value)
    cpu_adam.param_groups = optimizer.param_groups
    log.info("optimizer state offloaded: %s replaced by DeepSpeed's CPU Adam", type(optimizer).__name__)
    return cpu_adam


def describe_offload(config: dict[str, Any]) -> str:
    zero = config["zero_optimization"]
    parts = [
        f"{key} to {zero[key]['device']}"
        for key in ("offload_optimizer", "offload_param")
        if zero.get(key, {}).get("device", "none") != "none"
    ]
    return ", ".join(parts) or "no offload"


@contextlib.contextmanager
def accumulation_boundary(engine: Any, is_boundary: bool) -> Iterator[None]:
    """Tell DeepSpeed whether the coming backward ends an accumulation window."""
    if engine is None:
        yield
        return
    engine.set_gradient_accumulation_boundary(is_boundary)
    try:
        yield
    finally:
        engine.set_gradient_accumulation_boundary(True)


def require_async_io(device_type: str) -> None:
    """NVMe offload needs DeepSpeed's async_io op, which needs libaio; say so before starting."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise MissingDependencyError(
            "libaio",
            "DeepSpeed offload to NVMe (its async_io op)",
            install="apt-get install libaio-dev (Debian/Ubuntu), then run again",
        ) from None
