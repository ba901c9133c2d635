"""Full (unsharded) state saved by rank 0 into one file, written atomically, loaded with ``weights_only``.

Used by the single-device and DDP strategies, whose every rank holds the whole state. The file
is written to a temporary sibling, flushed to disk, then renamed over the target: a crash during
the save leaves the previous file intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.optim import Optimizer

from shardtrain.errors import CheckpointError


def to_saveable(state: Mapping[str, Any]) -> dict[str, Any]:
    """Modules and optimizers replaced by their state dicts; everything else kept as is."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, (nn.Module, Optimizer)) or hasattr(value, "state_dict") and callable(value.state_dict):
            out[key] = value.state_dict()
        else:
            out[key] = value
    return out


def save_full_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (call on one rank only)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(to_saveable(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_full_state(path: str | os.PathLike, state: dict[str, Any], map_location: Any = "cpu", strict: bool = True) -> dict[str, Any]:
    """Load ``path`` into the objects of ``state`` in place; returns the saved entries ``state`` did not name."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint file at {source}; check the path (a directory of a sharded checkpoint is loaded by Engine.load)")
    try:
        saved = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{source} is not a readable checkpoint ({error}); it may be half-written or not a shardtrain file") from error
    missing = [key for key in state if key not in saved]
    if missing and strict:
        raise CheckpointError(f"checkpoint {source} has no entries {missing}; it holds {sorted(saved)}")
    for key, target in state.items():
        if key not in saved:
            continue
        if isinstance(target, (nn.Module, Optimizer)) or hasattr(target, "load_state_dict"):
            try:
                target.load_state_dict(saved[key])
            except RuntimeError as error:  # missing/unexpected keys, shape mismatches: torch lists them
                raise CheckpointError(f"checkpoint {source} does not fit {key!r}: {error}") from error
        else:
            state[key] = saved[key]
    return {key: value for key, value in saved.items() if key not in state}
