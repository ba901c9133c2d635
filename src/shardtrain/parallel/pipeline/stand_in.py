"""What stands in for a parameter held beside the blocks on the pipeline stages that do not own it.

A model may hold parameters itself, beside its submodules (a hand-written GPT's ``self.pos``, a
ViT's ``cls_token``). The first stage owns them (``parallel/pipeline/split.py``), since a ``forward`` uses them
before the blocks; every later stage runs the same ``forward``, and reads them there too. What it
computes before its blocks is never used, so it needs no value: ``ParameterStandIn`` absorbs every
operation, keeping only the shape (on the meta device) for code that reads shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from shardtrain.errors import ConfigError


class ParameterStandIn:
    """Stands in, on a stage after the first, for a parameter held beside the blocks (``self.pos``).

    The ``forward`` uses such a parameter before the blocks, where what a later stage computes is never
    used (its first block reads the received activation). So every operation on this stand-in, or on
    what is computed from it, gives another stand-in and computes nothing; its shape follows on the meta
    device (``None`` where that fails: a later stage's embedding stand-ins give the hidden state's shape,
    not the embedding's), so code that reads shapes runs as on the first stage. An operation after the
    stage's first block has run means the parameter is used in or after the blocks: refused.
    """

    def __init__(self, runner: Any, name: str, meta: torch.Tensor | None) -> None:
        self.runner = runner
        self.name = name  # the parameter's, for errors
        self.meta = meta

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _apply(func, args, kwargs or {})

    @property
    def device(self) -> torch.device:
        received = self.runner.received
        return received.device if isinstance(received, torch.Tensor) else torch.device("cpu")

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        found = getattr(torch.Tensor, attribute)  # AttributeError for what a tensor does not have either
        if callable(found):
            return lambda *args, **kwargs: _apply(found, (self, *args), kwargs)
        return _apply(found.__get__, (self,), {})  # shape, dtype, ndim, T, ...

    def __len__(self) -> int:
        return self._known().shape[0]

    def __iter__(self) -> Any:
        return iter([self[index] for index in range(len(self))])

    def __bool__(self) -> bool:
        raise self._refusal("reads its value")

    def _known(self) -> torch.Tensor:
        if self.meta is None:
            raise self._refusal("reads the shape of what it computes from it")
        return self.meta

    def _refusal(self, what: str) -> ConfigError:
        return ConfigError(
            f"{self.name}, a parameter held beside the blocks, belongs to the first pipeline stage, but the model's "
            f"forward {what} on stage {self.runner.stage}, which does not own it. Parameters held beside the blocks "
            "are supported when only the forward's part before the blocks uses them (position embeddings, a class "
            f"token); move {self.name} into a submodule (a small nn.Module that holds it), registered after the "
            "blocks if the forward uses it after them, so that the stage that runs it owns it"
        )

    def __repr__(self) -> str:
        return f"ParameterStandIn({self.name}, on the first stage)"


_OPERATORS = (
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __floordiv__ __matmul__ "
    "__rmatmul__ __pow__ __rpow__ __neg__ __pos__ __abs__ __getitem__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ "
    "__and__ __or__ __invert__"
).split()
for _operator in _OPERATORS:
    setattr(
        ParameterStandIn,
        _operator,
        lambda self, *args, _name=_operator: _apply(getattr(torch.Tensor, _name), (self, *args), {}),
    )


def _apply(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func`` on stand-ins (``ParameterStandIn``): another stand-in, with the shape the meta device gives (or none)."""
    stand_in = next(leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, ParameterStandIn))
    if stand_in.runner.started:
        raise stand_in._refusal("uses it in or after the blocks")

    def meta(value: Any) -> Any:
        if isinstance(value, ParameterStandIn):
            return value._known()
        if isinstance(value, torch.Tensor):
            return torch.empty(value.shape, dtype=value.dtype, device="meta")
        return value

    try:
        output = func(*pytree.tree_map(meta, args), **pytree.tree_map(meta, kwargs))
    except Exception:  # a stand-in without a shape, what the meta device cannot compute, shapes that do not fit
        output = None
    if output is None or isinstance(output, torch.Tensor):
        return ParameterStandIn(stand_in.runner, stand_in.name, output)
    return pytree.tree_map(
        lambda v: ParameterStandIn(stand_in.runner, stand_in.name, v) if isinstance(v, torch.Tensor) else v, output
    )
