"""Checks that every rank set up the same run, made once at set-up with one collective.

Ranks that build different models (a shape read from a rank-dependent path, a typo in one
node's config) otherwise fail later and obscurely: a collective that hangs until its timeout,
or a shape error deep inside a sharding library. Comparing what each rank built, before any
sharding, turns that into one error that names the ranks and the difference.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from shardtrain.errors import ConfigError


def module_fingerprint(module: nn.Module) -> dict[str, tuple]:
    """Name -> (shape, dtype) of every parameter and buffer; meta tensors work (shapes only)."""
    tensors = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return {name: (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) for name, tensor in tensors}


def check_same_on_every_rank(what: str, value: Any, fix: str) -> None:
    """Raise ``ConfigError`` on every rank if ``value`` is not equal on all ranks.

    ``value`` must be plain data (it is compared after ``all_gather_object``). A no-op without a
    process group or with one rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    differing = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
    if differing:
        rank = differing[0]
        ranks = ", ".join(str(r) for r in differing)
        raise ConfigError(
            f"{what} differs between ranks: rank {ranks} against rank 0. {_difference(gathered[0], gathered[rank], rank)}. {fix}"
        )


def _difference(first: Any, other: Any, rank: int, limit: int = 5) -> str:
    if not (isinstance(first, dict) and isinstance(other, dict)):
        return f"rank 0 has {first!r}, rank {rank} has {other!r}"
    lines = []
    for name in first.keys() | other.keys():
        if first.get(name) != other.get(name):
            lines.append(f"{name}: rank 0 {_describe(first.get(name))}, rank {rank} {_describe(other.get(name))}")
    lines.sort()
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def _describe(entry: Any) -> str:
    if entry is None:
        return "has none"
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], tuple):
        return f"{list(entry[0])} {entry[1]}"
    return repr(entry)


def check_ranks_built_the_same(module: Any, settings: dict[str, Any]) -> None:
    """One collective at set-up: every rank built the same model with the same settings."""
    check_same_on_every_rank(
        "the model or the run's settings",
        {**module_fingerprint(module), **{f"[setting] {key}": value for key, value in settings.items()}},
        "Every rank must build the same model with the same arguments: look for a size or config read differently per rank or node.",
    )
