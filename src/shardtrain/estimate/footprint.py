"""Measure what a model holds for training, allocating nothing: the input of every memory formula.

The model is built on the meta device (no memory), so its parameters are counted exactly; a model
whose layers are already built (in ``__init__``, Lightning's common style) is measured through a
meta copy of itself, with the same shapes, so both ways of building give the same numbers; the
optimizer it configures takes one step on meta gradients, so its state is *read* from the real
optimizer class (AdamW: two fp32 moments; SGD with momentum: one; ...); one training step runs
on meta tensors under a saved-tensors hook, so activation memory is measured from the real
model, with or without activation checkpointing. Where each strategy keeps those bytes is the
strategy's own formula (``Strategy.estimate_memory``), not this module's.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from shardtrain.errors import ConfigError
from shardtrain.memory import ModelFootprint
from shardtrain.precision import Precision
from shardtrain.parallel.activation_checkpoint import apply_activation_checkpointing
from shardtrain.parallel.materialize import build_on_meta
from shardtrain.parallel.policy import repeated_blocks
from shardtrain.parallel.tensor_parallel.plan import Plan, check_head_counts, find_plan
from shardtrain.parallel.tensor_parallel.share import narrow_to_one_rank

__all__ = ["ModelFootprint", "measure_footprint"]

log = logging.getLogger(__name__)


def measure_footprint(
    module: nn.Module | Callable[[], nn.Module],
    *,
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    batch_size: int = 1,
    batch: Any = None,
    activation_checkpointing: bool = False,
    tensor_parallel_size: int | None = 1,
    tp_plan: Plan | None = None,
    sequence_parallel: bool = False,
) -> ModelFootprint:
    """Parameters, optimizer state and activations of ``module`` (see ``shardtrain.estimate_memory`` for the arguments).

    With ``tensor_parallel_size`` above 1 the footprint's ``tensor_parallel`` holds the same measures of
    one tensor-parallel rank's share, split by ``tp_plan`` or the model's own plan (``parallel.tensor_parallel.plan.find_plan``;
    its sequence-parallel plan with ``sequence_parallel``). ``None``: the devices of one node, where
    that is above 1 and the model has a plan that fits them (else no share, and no error).

    Raises ``ConfigError`` for a layout that is not whole numbers >= 1, a model that cannot be built
    on the meta device (the message names it), and, with tensor parallelism, a model without a plan,
    head counts the degree does not divide, or a plan that does not fit the model.
    """
    if not _whole(devices) or not _whole(num_nodes):
        raise ConfigError(
            f"devices and num_nodes must be whole numbers >= 1, got devices={devices!r}, num_nodes={num_nodes!r}"
        )
    required = tensor_parallel_size is not None
    tensor_parallel_size = devices if tensor_parallel_size is None else tensor_parallel_size
    if not _whole(tensor_parallel_size):
        raise ConfigError(f"tensor_parallel_size must be a whole number >= 1, got {tensor_parallel_size!r}")
    run_precision = Precision(precision)
    model = build_on_meta(module, run_precision.parameter_dtype, built_layers="measure")
    try:  # the copy is taken before anything below changes the model
        share = copy.deepcopy(model) if tensor_parallel_size > 1 else None
    except Exception as error:
        share, copy_error = None, error
    whole = _measure(model, run_precision, batch, batch_size, activation_checkpointing)
    footprint = ModelFootprint(**whole, precision=precision, devices=devices, num_nodes=num_nodes)
    if tensor_parallel_size == 1:
        return footprint
    try:
        if share is None:
            raise copy_error
        narrowed = _narrowed_share(share, tensor_parallel_size, devices * num_nodes, tp_plan, sequence_parallel)
        measured = _measure(narrowed, run_precision, batch, batch_size, activation_checkpointing)
    except Exception as error:
        if not required:
            log.debug("no tensor-parallel share at the devices of a node (%d): %s", tensor_parallel_size, error)
            return footprint  # the default degree: no share where the model cannot be split at it
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(
            f"measuring one tensor-parallel rank's share (tensor_parallel_size={tensor_parallel_size}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error
    return replace(
        footprint,
        tensor_parallel=ModelFootprint(
            **measured,
            precision=precision,
            devices=devices,
            num_nodes=num_nodes,
            tensor_parallel_size=tensor_parallel_size,
        ),
    )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _narrowed_share(
    share: nn.Module, tensor_parallel_size: int, world_size: int, tp_plan: Plan | None, sequence_parallel: bool
) -> nn.Module:
    """``share`` narrowed to one tensor-parallel rank's part, after the checks a launch would make."""
    if world_size % tensor_parallel_size:
        raise ConfigError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the {world_size} ranks of the run "
            "(devices x num_nodes); choose one that divides it"
        )
    check_head_counts(share, tensor_parallel_size)
    found = find_plan(share, tp_plan, sequence_parallel)
    if found is None:
        attribute = "sequence_parallel_tp_plan" if sequence_parallel else "tp_plan"
        raise ConfigError(
            f"tensor_parallel_size={tensor_parallel_size} but {type(share).__name__} has no "
            f"{'sequence-parallel' if sequence_parallel else 'tensor-parallel'} plan: pass "
            f"tp_plan={{'pattern': 'colwise', ...}}, or give the model a {attribute} attribute"
        )
    narrow_to_one_rank(found, tensor_parallel_size)
    return share


def _measure(
    model: nn.Module, run_precision: Precision, batch: Any, batch_size: int, activation_checkpointing: bool
) -> dict[str, int]:
    """The byte and count fields of a ``ModelFootprint`` for ``model``, built on the meta device."""
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
    return {
        "parameters": sum(p.numel() for p in unique),
        "trainable_parameters": sum(p.numel() for p in unique if p.requires_grad),
        "trainable_parameter_bytes": sum(p.numel() * p.element_size() for p in unique if p.requires_grad),
        "parameter_bytes": parameter_bytes,
        "optimizer_bytes": optimizer_bytes,
        "activation_bytes": activations,
        "largest_unit_bytes": largest_unit,
    }


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
    arguments = getattr(model, "_step_arguments", None)  # a TrainModule's step may leave out batch_idx
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), _FusedAttention():
        if callable(step):
            output = step(*(arguments("training_step", batch, 0) if callable(arguments) else (batch, 0)))
        else:
            output = model(batch)
    del output
    return sum(nbytes for _, nbytes in saved.values())


class _FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as the fused kernels run it, not its math decomposition.

    On the meta device the math decomposition runs, which keeps the whole attention matrix for
    backward; the kernels a run uses (flash and memory-efficient attention on GPU, the fused CPU
    kernel) keep only the inputs, the output and one log-sum-exp per row. This runs the flash
    kernel's meta function instead, which saves exactly that. Calls it cannot express (grouped
    key/value heads, ``enable_gqa``) keep the decomposition: an upper bound.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or kwargs.get("enable_gqa") or len(args) < 3:
            return func(*args, **kwargs)
        query, key, value, *rest = args
        given = {**dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), rest)), **kwargs}
        if not all(t.is_meta and t.dim() == 4 for t in (query, key, value)) or key.shape[1] != query.shape[1]:
            return func(*args, **kwargs)
        output, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query,
            key,
            value,
            given.get("dropout_p", 0.0),
            given.get("is_causal", False),
            attn_mask=given.get("attn_mask"),
            scale=given.get("scale"),
        )
        return output


def _to_meta(batch: Any) -> Any:
    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not value.is_meta:
            return torch.empty_like(value, device="meta")
        return value

    return tree_map(meta, batch)
