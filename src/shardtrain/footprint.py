"""Measure what a model holds for training, allocating nothing: the input of every memory formula.

The model is built on the meta device (no memory), so its parameters are counted exactly; the
optimizer it configures takes one step on meta gradients, so its state is *read* from the real
optimizer class (AdamW: two fp32 moments; SGD with momentum: one; ...); one training step runs
on meta tensors under a saved-tensors hook, so activation memory is measured from the real
model, with or without activation checkpointing. Where each strategy keeps those bytes is the
strategy's own formula (``Strategy.estimate_memory``), not this module's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from shardtrain.errors import ConfigError
from shardtrain.memory import ModelFootprint
from shardtrain.precision import Precision
from shardtrain.strategies.activation_checkpoint import apply_activation_checkpointing
from shardtrain.strategies.policy import repeated_blocks

__all__ = ["ModelFootprint", "measure_footprint"]


def measure_footprint(
    module: nn.Module | Callable[[], nn.Module],
    *,
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    batch_size: int = 1,
    batch: Any = None,
    activation_checkpointing: bool = False,
) -> ModelFootprint:
    """Parameters, optimizer state and activations of ``module`` (see ``shardtrain.estimate_memory`` for the arguments).

    Raises ``ConfigError`` for a layout that is not whole numbers >= 1, or a model that cannot be
    built on the meta device (the message names it).
    """
    if not isinstance(devices, int) or devices < 1 or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(
            f"devices and num_nodes must be whole numbers >= 1, got devices={devices!r}, num_nodes={num_nodes!r}"
        )
    run_precision = Precision(precision)
    model = build_on_meta(module, run_precision.parameter_dtype)
    unique = {id(p): p for p in model.parameters()}.values()
    parameter_bytes = sum(p.numel() * p.element_size() for p in unique)
    optimizer_bytes = _optimizer_state_bytes(model)
    blocks = repeated_blocks(model)
    largest_unit = max(
        (sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks), default=parameter_bytes
    )
    if activation_checkpointing and blocks:
        apply_activation_checkpointing(model, lambda m: any(m is b for b in blocks))
    activations = _activation_bytes(model, batch, batch_size)
    if run_precision.is_mixed:
        activations //= 2  # autocast keeps most saved activations in 16 bits (an estimate; fp32 parts are rare)
    return ModelFootprint(
        parameters=sum(p.numel() for p in unique),
        trainable_parameters=sum(p.numel() for p in unique if p.requires_grad),
        parameter_bytes=parameter_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activations,
        largest_unit_bytes=largest_unit,
        precision=precision,
        devices=devices,
        num_nodes=num_nodes,
    )


def fresh_copy(module: nn.Module) -> Callable[[], nn.Module]:
    """A factory of shallow copies of ``module`` for a trial build: ``configure_model()`` must run on the
    user's module only once, for real, and a copy's layers do not become the module's."""
    import copy

    def factory() -> nn.Module:
        clone = copy.copy(module)
        clone.__dict__ = {
            **module.__dict__,
            "_modules": dict(module._modules),
            "_parameters": dict(module._parameters),
            "_buffers": dict(module._buffers),
        }
        return clone

    factory.__name__ = type(module).__name__
    return factory


def build_on_meta(module: nn.Module | Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """``module`` (or what a factory returns) with ``configure_model()`` run on the meta device, in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = module() if not isinstance(module, nn.Module) else module
            configure = getattr(model, "configure_model", None)
            if callable(configure):
                configure()
    except Exception as error:
        where = (
            getattr(model, "__class__", type(module)).__name__
            if "model" in locals()
            else getattr(module, "__name__", "the model factory")
        )
        raise ConfigError(
            f"building {where} on the meta device failed: {type(error).__name__}: {error}. Every layer must be creatable without data (no .item(), no loading weights in configure_model)"
        ) from error
    finally:
        torch.set_default_dtype(previous)
    real = [name for name, p in model.named_parameters() if not p.is_meta]
    if real:
        raise ConfigError(
            f"{type(model).__name__} created parameters outside the meta device (e.g. {real[:3]}); build layers in configure_model() or the factory"
        )
    return model


def _optimizer_state_bytes(model: nn.Module) -> int:
    configure = getattr(model, "configure_optimizers", None)
    if not callable(configure):
        optimizers = [torch.optim.AdamW(model.parameters())]
    else:
        from shardtrain.optimization import parse_optimizers

        optimizers, _ = parse_optimizers(configure())
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.empty_like(parameter)
    total = 0
    for optimizer in optimizers:
        optimizer.step()
        total += sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
    for parameter in model.parameters():
        parameter.grad = None
    return total


def _activation_bytes(model: nn.Module, batch: Any, batch_size: int) -> int:
    if batch is None:
        example = getattr(model, "example_batch", None)
        if not callable(example):
            return 0
        batch = example(batch_size)
    batch = _to_meta(batch)
    parameters = {id(p) for p in model.parameters()}
    saved: dict[int, tuple[torch.Tensor, int]] = {}  # each saved tensor once; the tensor kept so its id stays unique

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:  # parameters saved for backward are model state, counted already
            saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())
        return tensor

    step = getattr(model, "training_step", None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = step(batch, 0) if callable(step) else model(batch)
    del output
    return sum(nbytes for _, nbytes in saved.values())


def _to_meta(batch: Any) -> Any:
    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not value.is_meta:
            return torch.empty_like(value, device="meta")
        return value

    return tree_map(meta, batch)
