"""A ``StatefulDataLoader``'s position in a checkpoint: every rank's ``state_dict()`` as JSON.

torchdata's ``StatefulDataLoader`` (e.g. over an ``IterableDataset``) saves its position as a
nested structure of tensors, bytes and plain values; it is stored, one state per rank, in the
checkpoint's ``meta.json`` (no pickle), and continues from there on the same number of ranks.
"""

from __future__ import annotations

import base64
from typing import Any

import torch
import torch.distributed as dist

from shardtrain.errors import CheckpointError


class LoaderPosition:
    """Every rank's ``StatefulDataLoader.state_dict()`` as JSON, gathered on save (every rank saves)."""

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def state_dict(self) -> dict[str, Any]:
        local = _to_json(self.loader.position())
        ranks = [local]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, local)
        return {"world_size": self.world_size, "ranks": ranks}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved["world_size"] != self.world_size:
            raise CheckpointError(
                f"the train DataLoader's position was saved by {saved['world_size']} processes and this run has "
                f"{self.world_size}; a StatefulDataLoader resumes only on as many processes as saved it"
            )
        self.loader.restore_position(_from_json(saved["ranks"][self.rank]))


def _to_json(value: Any) -> Any:
    """``value`` with tensors, bytes and non-string keys spelled in JSON (``_from_json`` reads it back)."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        return {"__tensor__": base64.b64encode(raw).decode(), "dtype": str(data.dtype), "shape": list(data.shape)}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _to_json(item) for key, item in value.items()}
        return {"__items__": [[_to_json(key), _to_json(item)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"the train DataLoader's state holds a {type(value).__name__}, which cannot be saved as JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        dtype = getattr(torch, value["dtype"].removeprefix("torch."))
        raw = bytearray(base64.b64decode(value["__tensor__"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(value["shape"]).clone()
    if "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if "__items__" in value:
        return {_from_json(key): _from_json(item) for key, item in value["__items__"]}
    return {key: _from_json(item) for key, item in value.items()}
