"""Where a run's model came from, recorded in every checkpoint so that exports need no flags.

``model_provenance(module)`` finds, without importing transformers or peft, the Hugging Face model inside
``module`` (the directory ``from_pretrained`` read, as transformers records it in ``name_or_path``) and the
peft adapters on it (each adapter's config, as peft writes it to ``adapter_config.json``). The Trainer saves it
in the checkpoint's JSON (``meta.json``, under ``state.pretrained``); ``recorded_provenance`` reads it back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from shardtrain.checkpoint.sharded import read_meta

CHECKPOINT_PROVENANCE = "pretrained"


def model_provenance(module: nn.Module) -> dict[str, Any]:
    """``{"model": directory or hub id, "adapters": {name: peft config}, "prefix": ...}``, the keys found only.

    ``prefix``: the state-dict name of the peft model inside ``module`` (``"model."`` for ``self.model``)."""
    found: dict[str, Any] = {}
    for name, submodule in module.named_modules():
        configs = getattr(submodule, "peft_config", None)
        if "adapters" not in found and isinstance(configs, dict) and hasattr(submodule, "base_model"):
            found["adapters"] = {adapter: _plain(config.to_dict()) for adapter, config in configs.items()}
            found["prefix"] = f"{name}." if name else ""
        source = vars(submodule).get("name_or_path")  # a transformers PreTrainedModel's own attribute
        if "model" not in found and isinstance(source, str) and source and hasattr(submodule, "config"):
            local = Path(source).expanduser()
            found["model"] = str(local.resolve()) if local.is_dir() else source
    return found


def recorded_provenance(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """What ``model_provenance`` recorded in ``checkpoint`` ({} for checkpoints saved before it existed)."""
    return dict(read_meta(checkpoint).get("state", {}).get(CHECKPOINT_PROVENANCE) or {})


def _plain(value: Any) -> Any:
    """peft's config as JSON holds it (sets as sorted lists, enums as their values)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "value", str(value))
