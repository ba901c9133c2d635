"""``TrainModule.load_from_checkpoint`` / ``DataModule.load_from_checkpoint``: build the object again from the
hyperparameters a checkpoint recorded, then (a module) load its weights, on one process without a process group.

Reads a checkpoint directory of any strategy and world size (the whole tensors, through the safe reader: no code
runs from the files) or consolidated safetensors weights (then every constructor argument comes from ``kwargs``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from shardtrain.checkpoint import read_meta
from shardtrain.checkpoint.consolidate import is_weights_file, read_module_weights
from shardtrain.errors import CheckpointError
from shardtrain.hparams import HPARAMS_KEY, constructor_arguments

T = TypeVar("T")

#: Where a Trainer checkpoint's JSON state keeps the hyperparameters: ``{"module": ..., "datamodule": ...}``.
CHECKPOINT_HPARAMS = "hparams"


def recorded_hparams(path: str | os.PathLike, owner: str) -> dict[str, Any]:
    """The hyperparameter entries a checkpoint recorded for ``owner`` (``"module"`` or ``"datamodule"``)."""
    if is_weights_file(path):
        return {}
    state = read_meta(path).get("state", {})
    return dict((state.get(CHECKPOINT_HPARAMS) or {}).get(owner) or {})


def load_module(
    cls: type[T],
    base: type,
    checkpoint_path: str | os.PathLike,
    map_location: Any = None,
    hparams_file: str | os.PathLike | None = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> T:
    """Lightning's ``LightningModule.load_from_checkpoint`` for shardtrain checkpoints (see ``TrainModule``);
    ``base``: shardtrain's ``TrainModule``, to tell whether ``cls`` defines ``configure_model`` itself."""
    path = Path(checkpoint_path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    saved = _with_hparams_file(recorded_hparams(path, "module"), hparams_file)
    module = cls(**constructor_arguments(cls, saved, kwargs, str(path)))
    if getattr(cls, "configure_model") is not getattr(base, "configure_model"):
        module.configure_model()  # type: ignore[attr-defined]
    weights = read_module_weights(path)
    meta_state = {} if is_weights_file(path) else read_meta(path).get("state", {})
    loop = meta_state.get("loop", {})
    checkpoint = {
        "state_dict": weights,
        HPARAMS_KEY: saved.get(HPARAMS_KEY, {}),
        "global_step": loop.get("global_step"),
        "epoch": loop.get("current_epoch"),
    }
    module.on_load_checkpoint(checkpoint)  # type: ignore[attr-defined]
    module.load_state_dict(checkpoint["state_dict"], strict=True if strict is None else strict)  # type: ignore[attr-defined]
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        module = module.to(torch.device(map_location))  # type: ignore[attr-defined]
    return module


def load_datamodule(
    cls: type[T], checkpoint_path: str | os.PathLike, hparams_file: str | os.PathLike | None = None, **kwargs: Any
) -> T:
    """Lightning's ``LightningDataModule.load_from_checkpoint``: the DataModule built from its recorded
    hyperparameters, with its saved ``state_dict`` loaded."""
    path = Path(checkpoint_path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    saved = _with_hparams_file(recorded_hparams(path, "datamodule"), hparams_file)
    datamodule = cls(**constructor_arguments(cls, saved, kwargs, str(path)))
    state = {} if is_weights_file(path) else read_meta(path).get("state", {})
    if state.get("datamodule"):
        datamodule.load_state_dict(state["datamodule"])  # type: ignore[attr-defined]
    return datamodule


def _with_hparams_file(saved: dict[str, Any], hparams_file: str | os.PathLike | None) -> dict[str, Any]:
    """Lightning's ``hparams_file``: a YAML file whose values replace the recorded hyperparameters."""
    if hparams_file is None:
        return saved
    source = Path(hparams_file)
    if source.suffix.lower() not in (".yaml", ".yml"):
        raise CheckpointError(f"hparams_file must be a .yaml or .yml file, got {source}")
    loaded = yaml.safe_load(source.read_text()) or {}
    return {**saved, HPARAMS_KEY: loaded, "hyper_parameters_left_out": {}}
