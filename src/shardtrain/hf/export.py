"""Export a shardtrain checkpoint of a Hugging Face model as a directory transformers' ``from_pretrained`` loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from shardtrain.checkpoint.consolidate import _bytes, _metadata, consolidate
from shardtrain.checkpoint.provenance import recorded_provenance
from shardtrain.checkpoint.sharded import read_meta
from shardtrain.errors import CheckpointError, ConfigError
from shardtrain.hf.adapters import export_adapters
from shardtrain.hf.pretrained import _architecture, require_transformers, resolve_model_directory

#: Files besides the weights that a model directory carries and an export keeps.
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def export_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    merge_adapters: bool = False,
) -> list[Path]:
    """Write ``checkpoint``'s model as a Hugging Face directory: ``config.json`` (and the generation
    config and tokenizer files the source directory had), safetensors shards with the model's own key
    names and an index. Tied weights are stored once, as ``save_pretrained`` does. One process, one
    output file's tensors in memory at a time, whatever world size saved the checkpoint.

    A run that trained peft adapters gives peft's adapter directory (``adapter_config.json``,
    ``adapter_model.safetensors``), or with ``merge_adapters`` the model with the adapters merged in
    (``shardtrain.hf.adapters.export_adapters``).

    ``config``: the model directory the run started from (default: the one the checkpoint recorded,
    which ``from_pretrained`` reads; for older checkpoints the ``model`` argument in the run's
    ``config.yaml`` beside them). ``dtype``: e.g. ``torch.bfloat16`` to halve the files.
    """
    transformers = require_transformers()
    source = Path(checkpoint)
    provenance = recorded_provenance(source)
    model_dir = resolve_model_directory(
        config if config is not None else provenance.get("model") or _model_of_run(source)
    )
    output = Path(output)
    if provenance.get("adapters"):
        files = export_adapters(
            source, output, model_dir, provenance, merge=merge_adapters, max_shard_bytes=max_shard_bytes, dtype=dtype
        )
        if merge_adapters:
            _copy_companions(model_dir, output)
        return files
    if merge_adapters:
        raise ConfigError(f"--merge-adapters: {source} was saved by a run without peft adapters; leave it out")
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = _architecture(transformers, hf_config)._from_config(hf_config)
    names = _stored_names(source, model)
    output.mkdir(parents=True, exist_ok=True)
    stored = _metadata(source)
    key = (read_meta(source).get("modules") or ["module"])[0]
    total = sum(_bytes(stored[f"{key}.{name}"], dtype) for name in names.values())
    target = output / "model.safetensors" if total <= max_shard_bytes else output  # one file: no index, as transformers
    files = consolidate(source, target, max_shard_bytes=max_shard_bytes, names=names, dtype=dtype)
    if dtype is not None:
        hf_config.dtype = dtype
    hf_config.save_pretrained(output)
    _copy_companions(model_dir, output)
    return files


def _copy_companions(model_dir: Path, output: Path) -> None:
    for name in COMPANION_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output / name)


def _stored_names(source: Path, model: Any) -> dict[str, str]:
    """The model's own key -> its name in the checkpoint's first module (which holds it under an attribute)."""
    key = (read_meta(source).get("modules") or ["module"])[0]
    stored = [name[len(key) + 1 :] for name in _metadata(source) if name.startswith(key + ".")]
    tied_targets = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    seen: set[int] = set()
    wanted = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or name in tied_targets:
            continue  # a tied weight is stored once, under its source's name
        seen.add(id(tensor))
        wanted.append(name)
    anchor = wanted[0]
    prefixes = [name[: -len(anchor)] for name in stored if name == anchor or name.endswith("." + anchor)]
    for prefix in prefixes:
        if all(prefix + name in stored for name in wanted):
            return {name: prefix + name for name in wanted}
    missing = [name for name in wanted if not any(s.endswith(name) for s in stored)]
    raise CheckpointError(
        f"{source} does not hold {type(model).__name__}'s weights"
        + (f" (missing {', '.join(missing[:8])})" if missing else "")
        + "; pass --hf-config the directory of the model this run trained"
    )


def _model_of_run(checkpoint: Path) -> str:
    """The ``model`` init argument of the run config saved beside the checkpoints (``CausalLM(model=...)``)."""
    for run_dir in (checkpoint.parent.parent, checkpoint.parent):
        path = run_dir / "config.yaml"
        if path.is_file():
            model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
            found = (model.get("init_args") or {}).get("model") if isinstance(model, dict) else None
            if isinstance(found, str):
                return found
    raise ConfigError(
        f"no Hugging Face model directory found for {checkpoint} (its run config has no model.init_args.model): "
        "pass --hf-config DIR, the directory of the model the run started from"
    )
