"""Weights a module brings from elsewhere (a pretrained checkpoint), read once its tensors have their layout.

A module built on the meta device may carry a *weight source* (``attach_weight_source``): an object
that fills named tensors in place from files, such as ``shardtrain.hf.from_pretrained``'s reader of
a Hugging Face checkpoint. Strategies materialise the model as usual, except that modules whose
tensors all come from the source are not initialised (``modules_read_whole``); the others, and the
buffers no checkpoint holds (rotary frequencies), are. Materialising then calls
``load_attached_weights``: each rank hands the source the tensors it holds, in their final layout
(plain tensors, or the DTensor shards of FSDP and tensor parallelism), so that it reads only its
own part. Under ZeRO-3, ``materialize_in_units`` calls it per unit, before DeepSpeed partitions it.

Names are the source module's own ``state_dict`` names; tensors still on the meta device (another
pipeline stage's) are not asked for.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

_ATTRIBUTE = "_shardtrain_weight_source"


class WeightSource(Protocol):
    """Fills a module's tensors from stored weights."""

    def read_into(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the stored values into ``tensors`` (names as the module's ``state_dict``), in place;
        a ``DTensor`` receives only its local shard."""

    def reads(self, name: str) -> bool:
        """Whether the tensor of this ``state_dict`` name comes from the stored weights."""


def attach_weight_source(module: nn.Module, source: WeightSource) -> None:
    """Mark ``module``'s tensors as coming from ``source`` once the strategy has laid them out."""
    object.__setattr__(module, _ATTRIBUTE, source)


def detach_weight_source(module: nn.Module) -> None:
    if weight_source_of(module) is not None:
        object.__delattr__(module, _ATTRIBUTE)


def weight_source_of(module: nn.Module) -> WeightSource | None:
    """The source attached to ``module`` itself. Read from its ``__dict__``, not ``getattr``: a wrapper that
    forwards unknown attributes to the module it wraps (peft's ``PeftModel``) does not carry the source."""
    return vars(module).get(_ATTRIBUTE)


def has_weight_sources(root: nn.Module) -> bool:
    return any(weight_source_of(m) is not None for m in root.modules())


def modules_read_whole(root: nn.Module) -> set[int]:
    """Ids of the modules under ``root`` whose own tensors all come from an attached source, so that
    initialising them would be overwritten: materialising skips them (as transformers does)."""
    found: set[int] = set()
    for sourced in [m for m in root.modules() if weight_source_of(m) is not None]:
        source = weight_source_of(sourced)
        assert source is not None
        stored: set[int] = set()  # modules with stored tensors of their own
        for name, module in sourced.named_modules():
            prefix = f"{name}." if name else ""
            own = [n for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None]
            computed = module._non_persistent_buffers_set & set(module._buffers)  # e.g. rotary frequencies
            if computed:
                continue
            if own and all(source.reads(prefix + n) for n in own):
                found.add(id(module))
            if own:
                stored.add(id(module))
        # A module with no tensors of its own (a block, the model) initialises nothing that is not read,
        # as long as every module below it with stored tensors is read whole; a module with computed
        # buffers (rotary frequencies) is initialised on its own. Skipping also spares FSDP's gathers.
        for module in sourced.modules():
            if not any(t is not None for t in (*module._parameters.values(), *module._buffers.values())) and all(
                id(m) in found for m in module.modules() if id(m) in stored
            ):
                found.add(id(module))
    return found


def load_attached_weights(
    root: nn.Module, within: nn.Module | None = None, done: set[tuple[int, str]] | None = None
) -> None:
    """Fill the tensors of every module under ``root`` that carries a weight source.

    ``within``: only the tensors of this submodule (a ZeRO-3 unit about to be partitioned), or of the
    sourced modules inside it. ``done``: (id of the sourced module, name) already filled: skipped, and extended.
    """
    within = within if within is not None else root
    for sourced in [m for m in root.modules() if weight_source_of(m) is not None]:
        prefix = _path_to(within, sourced)
        if prefix is not None:  # a part of the model (a ZeRO-3 unit)
            part = within
        elif _path_to(sourced, within) is not None:  # the whole model is inside ``within``
            prefix, part = "", sourced
        else:
            continue
        source = weight_source_of(sourced)
        assert source is not None
        tensors = {  # not the tensors the source does not hold (adapters added to the model after it was read)
            name: tensor
            for name, tensor in part.state_dict(prefix=prefix, keep_vars=True).items()
            if not tensor.is_meta
            and _is_whole_or_sharded(tensor)
            and (done is None or (id(sourced), name) not in done)
            and source.reads(name)
        }
        if tensors:
            source.read_into(tensors)
        if done is not None:
            done.update((id(sourced), name) for name in tensors)


def _path_to(module: nn.Module, ancestor: nn.Module) -> str | None:
    """``module``'s state-dict prefix inside ``ancestor`` ('' for itself, 'a.b.'), or None if not inside it."""
    for name, candidate in ancestor.named_modules(remove_duplicate=False):
        if candidate is module:
            return f"{name}." if name else ""
    return None


def _is_whole_or_sharded(tensor: torch.Tensor) -> bool:
    """False for a parameter DeepSpeed has already partitioned (its data is an empty placeholder)."""
    return not hasattr(tensor, "ds_id")
