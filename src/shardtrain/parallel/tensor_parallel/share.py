"""One tensor-parallel rank's share of a model, built on the meta device for the memory estimate.

``narrow_to_one_rank`` gives each module a plan names the parameters one rank of a
``tensor_parallel_size`` group holds after ``parallelize_module`` (the same shapes as the local
part of its DTensors, the larger part where a size does not divide), and makes its output the
shape that rank computes: split where the style leaves it split, whole where the style gathers
or sums it. Running a training step on the narrowed model then measures the rank's activations
the way ``shardtrain.estimate.footprint`` measures any model's, from the real model code.

Sequence parallelism is followed from the styles' layouts: where a style cuts a whole input
along a dimension (``PrepareModuleInput`` to ``Shard``, a ``RowwiseParallel`` whose output is
``Shard``), the share's tensor is cut there; where it gathers one (``PrepareModuleInput`` to
``Replicate``, a ``ColwiseParallel`` whose input arrives ``Shard``), it is widened again. The
``SequenceParallel`` norms between them then run on the share's cut tensors, as the real ones run
on their local shards. Styles other than PyTorch's ``ColwiseParallel``, ``RowwiseParallel``,
``SequenceParallel`` and ``PrepareModuleInput`` are refused (no estimate).
Nothing here runs in training; ``plan.apply_plan`` does the real split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from shardtrain.errors import ConfigError
from shardtrain.parallel.materialize import shared_parameters
from shardtrain.parallel.tensor_parallel.plan import FoundPlan, plan_targets


def narrow_to_one_rank(found: FoundPlan, tensor_parallel_size: int) -> list[str]:
    """Narrow, in place, the meta-device modules ``found`` names to one rank's share; returns their names.

    Raises ``ConfigError`` for a plan that names no module or a style this estimate cannot follow.
    """
    targets = plan_targets(found)
    ties = shared_parameters(found.root)
    for name, module, style in targets:
        _narrow(name, module, style, tensor_parallel_size)
    for owners in ties:  # narrowed alike (vocabulary-split embedding and output layer): tied again
        params = [module._parameters[name] for module, name in owners]
        if all(param.shape == params[0].shape for param in params):
            for module, name in owners:
                module._parameters[name] = params[0]
    return [name for name, _, _ in targets]


def _narrow(name: str, module: nn.Module, style: ParallelStyle, ranks: int) -> None:
    kind = type(style)
    if kind is SequenceParallel:
        return  # parameters replicated; the input arrives cut along the sequence and stays so
    if kind is PrepareModuleInput:
        _follow_input_layouts(module, style, ranks)
        return
    if kind not in (ColwiseParallel, RowwiseParallel):
        raise ConfigError(
            f"the memory estimate cannot follow {kind.__name__} (on {name!r}); it knows PyTorch's ColwiseParallel, "
            "RowwiseParallel, SequenceParallel and PrepareModuleInput"
        )
    colwise = kind is ColwiseParallel
    whole_output = module.weight.shape[0 if isinstance(module, nn.Linear) else 1]
    if isinstance(module, nn.Linear):
        # ColwiseParallel splits a Linear's output features (weight rows, bias); RowwiseParallel its input features.
        _split(module, "weight", 0 if colwise else 1, ranks)
        if colwise and module.bias is not None:
            _split(module, "bias", 0, ranks)
        split_features = module.weight.shape[1] if not colwise else None
    else:  # an nn.Embedding (plan_targets refuses other modules): colwise splits the dimension, rowwise the vocabulary
        _split(module, "weight", 1 if colwise else 0, ranks)
        module.padding_idx = None  # an index past this rank's rows; the lookup on meta tensors checks nothing
        split_features = None
    arriving, leaving = style.input_layouts[0], style.output_layouts[0]
    if colwise and isinstance(arriving, Shard):  # input arrives cut (along the sequence) and is gathered
        module.register_forward_pre_hook(lambda _module, args: (_widen(args[0], ranks, arriving.dim), *args[1:]))
    if colwise and isinstance(leaving, Replicate):
        module.register_forward_hook(lambda _module, _args, output: _widen(output, ranks, -1)[..., :whole_output])
    if split_features is not None and isinstance(arriving, Replicate):
        # The whole input arrives and each rank takes its own slice of the features.
        module.register_forward_pre_hook(lambda _module, args: (args[0][..., :split_features], *args[1:]))
    if not colwise and isinstance(leaving, Shard):  # the sum is scattered (along the sequence)
        module.register_forward_hook(lambda _module, _args, output: _cut(output, ranks, leaving.dim))


def _follow_input_layouts(module: nn.Module, style: PrepareModuleInput, ranks: int) -> None:
    """``PrepareModuleInput``: each positional input cut where it goes from whole to ``Shard``, widened
    where it goes from ``Shard`` to whole."""
    changes = list(zip(style.input_layouts or (), style.desired_input_layouts or ()))

    def prepare(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        prepared = list(args)
        for index, (have, want) in enumerate(changes[: len(args)]):
            if isinstance(have, Replicate) and isinstance(want, Shard):
                prepared[index] = _cut(args[index], ranks, want.dim)
            elif isinstance(have, Shard) and isinstance(want, Replicate):
                prepared[index] = _widen(args[index], ranks, have.dim)
        return tuple(prepared)

    module.register_forward_pre_hook(prepare)


def _split(module: nn.Module, attribute: str, dim: int, ranks: int) -> None:
    old = module._parameters[attribute]
    shape = list(old.shape)
    shape[dim] = math.ceil(shape[dim] / ranks)  # rank 0's part, the largest (DTensor's Shard)
    module._parameters[attribute] = nn.Parameter(
        torch.empty(shape, dtype=old.dtype, device="meta"), requires_grad=old.requires_grad
    )


def _widen(tensor: torch.Tensor, ranks: int, dim: int) -> torch.Tensor:
    """A cut tensor gathered back whole along ``dim`` (``cat`` keeps the autograd graph and saves nothing)."""
    return torch.cat([tensor] * ranks, dim=dim)


def _cut(tensor: torch.Tensor, ranks: int, dim: int) -> torch.Tensor:
    """Rank 0's part of ``tensor`` along ``dim`` (DTensor's ``Shard``: the larger part where it does not divide)."""
    return tensor.narrow(dim, 0, math.ceil(tensor.shape[dim] / ranks))
