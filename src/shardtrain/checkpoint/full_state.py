"""A full (unsharded) training state in one file: written atomically, read with ``weights_only``.

The file is written to a temporary sibling, flushed to disk, then renamed over the target, so a
crash during a save leaves the previous file intact. Reading uses ``torch.load(weights_only=True)``:
tensors, numbers, strings and containers only; loading cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from shardtrain.errors import CheckpointError


def write_state_file(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plain values and tensors) to ``path`` atomically. Call on one rank only."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(dict(state), handle)
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


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by ``write_state_file``; tensors are loaded on the CPU."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint file at {source}; check the path")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{source} is not a readable checkpoint ({error}); it may be half-written or not a shardtrain file") from error
