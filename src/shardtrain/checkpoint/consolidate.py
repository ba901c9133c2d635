"""Export a sharded checkpoint's model weights to safetensors, and read such files back.

Works on one process, whatever world size the checkpoint was saved with: each tensor is read
from the DCP shards on its own (``dcp.load`` of one key), so memory holds at most one output
file's tensors. Models past ``max_shard_bytes`` are split into several files with a
``model.safetensors.index.json`` (the layout Hugging Face uses).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from shardtrain.checkpoint.safe_reader import load_tensors, read_metadata
from shardtrain.checkpoint.sharded import read_meta, verify_checkpoint
from shardtrain.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def consolidate(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    key: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    names: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write the weights under ``key`` (default: the checkpoint's first module) to safetensors.

    ``output`` is a ``.safetensors`` file, or a directory when the weights exceed
    ``max_shard_bytes`` (then ``model-0000i-of-0000n.safetensors`` plus the index). Returns the files written.
    ``names``: output name -> stored name (under ``key``) of the tensors to write, to rename or
    leave some out (default: all, as stored). ``dtype``: convert floating-point tensors to it.
    """
    source = Path(checkpoint)
    meta = read_meta(source)
    key = key or (meta.get("modules") or ["module"])[0]
    stored = {
        name[len(key) + 1 :]: info
        for name, info in _metadata(source).items()
        if name.startswith(key + ".") and isinstance(info, TensorStorageMetadata)
    }
    if not stored:
        raise CheckpointError(f"{source} holds no tensors under {key!r}; its modules are {meta.get('modules')}")
    names = dict(names) if names is not None else {name: name for name in stored}
    absent = [name for name in names.values() if name not in stored]
    if absent:
        raise CheckpointError(f"{source} holds no {', '.join(absent[:8])} under {key!r}")
    tensors = {out: stored[name] for out, name in names.items()}
    groups = _group_by_size(tensors, max_shard_bytes, dtype)
    target = Path(output)
    if len(groups) == 1 and target.suffix == ".safetensors":
        files = [target]
    else:
        target.mkdir(parents=True, exist_ok=True)
        files = [target / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for group, path in zip(groups, files):
        chunk = {name: _cast(_read_tensor(source, f"{key}.{names[name]}", tensors[name]), dtype) for name in group}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(chunk, str(path), metadata={"format": "pt", "source": str(source)})
        weight_map.update({name: path.name for name in group})
        del chunk
    if len(files) > 1 or target.is_dir():
        total = sum(_bytes(info, dtype) for info in tensors.values())
        (target / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    return files


def consolidate_optimizer(checkpoint: str | os.PathLike, output: str | os.PathLike, *, key: str | None = None) -> Path:
    """Write the optimizer state tensors (e.g. AdamW's moments) to one safetensors file.

    Keys are ``state.<parameter name>.<entry>`` (e.g. ``state.blocks.0.mlp.up.weight.exp_avg``),
    the layout of ``torch.distributed.checkpoint.state_dict``; hyperparameters stay in the checkpoint.
    """
    source = Path(checkpoint)
    read_meta(source)
    metadata = _metadata(source)
    prefix = key or next(
        (name.split(".state.")[0] for name in metadata if ".state." in name and name.startswith("optimizer")), None
    )
    if prefix is None:
        raise CheckpointError(f"{source} holds no optimizer state")
    tensors = {
        name[len(prefix) + 1 :]: info
        for name, info in metadata.items()
        if name.startswith(prefix + ".state.") and isinstance(info, TensorStorageMetadata)
    }
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: _read_tensor(source, f"{prefix}.{name}", info) for name, info in tensors.items()},
        str(target),
        metadata={"format": "pt", "source": str(source)},
    )
    return target


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, an index file, or a directory holding one."""
    source = Path(path)
    if source.is_dir():
        index = source / INDEX_FILE
        files = (
            sorted(source.glob("*.safetensors"))
            if not index.exists()
            else sorted({source / f for f in json.loads(index.read_text())["weight_map"].values()})
        )
    elif source.name.endswith(".index.json"):
        files = sorted({source.parent / f for f in json.loads(source.read_text())["weight_map"].values()})
    else:
        files = [source]
    if not files or not all(f.is_file() for f in files):
        raise CheckpointError(f"no safetensors weights at {source}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def read_module_weights(checkpoint: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """The whole tensors of a checkpoint's module (default: its first), keyed by parameter names, read on one process
    whatever world size and strategy saved it; or the state dict of consolidated weights (``is_weights_file``)."""
    if is_weights_file(checkpoint):
        return load_weights(checkpoint)
    source = Path(checkpoint)
    key = key or (read_meta(source).get("modules") or ["module"])[0]
    tensors = {
        name[len(key) + 1 :]: torch.empty(info.size, dtype=info.properties.dtype)
        for name, info in _metadata(source).items()
        if name.startswith(key + ".") and isinstance(info, TensorStorageMetadata)
    }
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors under {key!r}")
    load_tensors({key: tensors}, source, no_dist=True)
    return tensors


def is_weights_file(path: str | os.PathLike) -> bool:
    source = Path(path)
    return (
        source.suffix == ".safetensors"
        or source.name.endswith(".index.json")
        or (source.is_dir() and (source / INDEX_FILE).exists())
    )


def _metadata(source: Path) -> dict[str, Any]:
    """DCP's metadata of a checkpoint whose files were first verified against their checksums (one process)."""
    verify_checkpoint(source, distributed=False)
    return read_metadata(source).state_dict_metadata


def _read_tensor(source: Path, name: str, info: TensorStorageMetadata) -> torch.Tensor:
    tensor = torch.empty(info.size, dtype=info.properties.dtype)
    load_tensors({name: tensor}, source, no_dist=True)
    return tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _bytes(info: TensorStorageMetadata, dtype: torch.dtype | None = None) -> int:
    stored = info.properties.dtype
    size = torch.empty((), dtype=dtype if dtype is not None and stored.is_floating_point else stored).element_size()
    return info.size.numel() * size


def _group_by_size(
    tensors: dict[str, TensorStorageMetadata], limit: int, dtype: torch.dtype | None = None
) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, info in tensors.items():
        nbytes = _bytes(info, dtype)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups
