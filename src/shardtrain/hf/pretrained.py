"""A pretrained Hugging Face model, built where the strategy builds layers and read straight into its shards.

``from_pretrained(path)`` inside ``configure_model()`` builds the transformers model from its config.
Under a sharding strategy (FSDP, tensor or pipeline parallelism, ZeRO-3 with delayed init) that is
the meta device: nothing is read yet. The strategy lays the model out, initialises it (which also
makes the buffers no checkpoint holds, such as rotary frequencies), and then each rank reads only
the tensors, and parts of tensors, it holds, with PyTorch's DCP ``HuggingFaceStorageReader``
(safetensors slices, no unpickling). Elsewhere (``single``, ``ddp``, ZeRO-1/2) the model is built on
the device and read at once, as transformers does.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardtrain.checkpoint.safe_reader import SafeLoadPlanner, quiet_single_process
from shardtrain.errors import CheckpointError, ConfigError, MissingDependencyError
from shardtrain.parallel.materialize import materialize
from shardtrain.parallel.weight_source import attach_weight_source, detach_weight_source

INDEX_FILE = "model.safetensors.index.json"

#: peft adapts a layer in place, renaming its tensors: ``q_proj.weight`` becomes ``q_proj.base_layer.weight``
#: (LoRA), and a layer in ``modules_to_save`` holds ``lm_head.original_module.weight`` and a trained copy,
#: ``lm_head.modules_to_save.<adapter>.weight``. Each reads the checkpoint's ``q_proj.weight``/``lm_head.weight``.
_PEFT_WRAPPER = re.compile(r"\.(?:base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise MissingDependencyError("transformers", "Hugging Face models", extra="hf") from error
    return transformers


def from_pretrained(path: str | os.PathLike, *, model_class: Any = None, **config_overrides: Any) -> nn.Module:
    """A transformers model with the weights of the checkpoint at ``path``, for ``configure_model()``.

    Args:
        path: a directory holding ``config.json`` and ``*.safetensors`` (one file, or several with
            ``model.safetensors.index.json``), or a hub id already in the Hugging Face cache
            (``hf download ID`` first: ranks never download).
        model_class: the transformers class to build (default: the config's ``architectures[0]``).
        config_overrides: config values to change, e.g. ``attn_implementation="sdpa"`` or dropout.

    Built in the parameter dtype of the run (a bf16 checkpoint gives fp32 weights under fp32
    training). Raises ``CheckpointError`` naming the keys if the files do not hold exactly this
    model's tensors.
    """
    transformers = require_transformers()
    directory = resolve_model_directory(path)
    attn = config_overrides.pop("attn_implementation", None)
    config = transformers.AutoConfig.from_pretrained(directory, **config_overrides)
    if attn is not None:
        config._attn_implementation = attn
    cls = model_class or _architecture(transformers, config)
    device = torch.empty(()).device  # where the strategy builds layers: the meta device under sharding
    with torch.device("meta"):
        try:
            model = cls._from_config(config, dtype=torch.get_default_dtype())
        except (AttributeError, TypeError, ValueError) as error:
            raise ConfigError(
                f"{getattr(cls, '__name__', cls)} cannot be built from {directory}'s config "
                f"({type(config).__name__}): {error}; pass the model_class of that config, or none"
            ) from error
    weights = HuggingFaceWeights(directory, model)
    model.name_or_path = str(path)
    attach_weight_source(model, weights)
    if device.type != "meta":  # not a sharding strategy: read it all now
        materialize(model, device)
        detach_weight_source(model)
    return model


def resolve_model_directory(path: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id's snapshot in the local Hugging Face cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or str(path).count("/") > 1 or str(path).startswith((".", "/")):
        raise CheckpointError(
            f"{path} is not a directory holding a Hugging Face checkpoint (config.json, *.safetensors)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(path), local_files_only=True))
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a local directory, and the hub id is not in the Hugging Face cache: download it first "
            f"(`hf download {path}`) or pass the directory; ranks never download"
        ) from error


def stored_tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers (the files of the index, or the directory's)."""
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted({directory / file for file in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        raise CheckpointError(
            f"{directory} holds no *.safetensors files"
            + (f" (found {', '.join(pickled)}: pickle files are not loaded, since that runs code)" if pickled else "")
            + "; save the model with save_pretrained(..., safe_serialization=True) or convert it to safetensors"
        )
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


class HuggingFaceWeights:
    """The weights of a Hugging Face checkpoint directory, matched to a model's state-dict names.

    Tied tensors (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) are stored once; every
    name that shares the tensor reads the stored one. A checkpoint saved from the base model (keys
    without the ``base_model_prefix``, as the original GPT-2 files) is read too.
    """

    def __init__(self, directory: Path, model: nn.Module) -> None:
        self.directory = directory
        stored = stored_tensor_shapes(directory)
        prefix = getattr(model, "base_model_prefix", "")
        groups: dict[int, list[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            groups.setdefault(id(tensor), []).append(name)

        def stored_name(name: str) -> str | None:
            if name in stored:
                return name
            bare = name.removeprefix(f"{prefix}.") if prefix else name
            return bare if bare in stored else None

        self.stored_name: dict[str, str] = {}
        missing: list[str] = []
        mismatched: list[str] = []
        shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        for names in groups.values():
            found = [stored_name(n) for n in names if stored_name(n) is not None]
            if not found:
                missing += [n for n in names if not _ignored(model, "_keys_to_ignore_on_load_missing", n)]
                continue
            if stored[found[0]] != shapes[names[0]]:
                mismatched.append(f"{names[0]}: checkpoint {stored[found[0]]}, model {shapes[names[0]]}")
            self.stored_name.update(dict.fromkeys(names, found[0]))
        unexpected = sorted(
            set(stored)
            - set(self.stored_name.values())
            - {n for n in stored if _ignored(model, "_keys_to_ignore_on_load_unexpected", n)}
        )
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"the checkpoint in {directory} does not hold {type(model).__name__}'s weights: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {_some(missing)}" if missing else "",
                        f"unexpected {_some(unexpected)}" if unexpected else "",
                        f"shapes differ for {_some(mismatched)}" if mismatched else "",
                    )
                    if part
                )
                + ". Check that the path and model_class are the checkpoint's model (its config.json 'architectures')"
            )

    def reads(self, name: str) -> bool:
        return _PEFT_WRAPPER.sub("", name) in self.stored_name

    def read_into(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the stored values into ``tensors`` in place: a DTensor reads only its shard's slice."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        rounds: list[dict[str, torch.Tensor]] = []  # a stored tensor read into two tensors (tied copies) twice
        for name, tensor in tensors.items():
            key = self.stored_name[_PEFT_WRAPPER.sub("", name)]
            for state in rounds:
                if key not in state or state[key] is tensor:
                    state[key] = tensor
                    break
            else:
                rounds.append({key: tensor})
        with torch.no_grad(), quiet_single_process():
            for state in rounds:
                dcp.load(
                    state,
                    storage_reader=HuggingFaceStorageReader(str(self.directory)),
                    planner=SafeLoadPlanner(self.directory),
                    no_dist=True,
                )


def _architecture(transformers: Any, config: Any) -> Any:
    names = getattr(config, "architectures", None) or []
    for name in names:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ConfigError(
        f"the config names no transformers class (architectures={names}); pass model_class=, e.g. "
        "transformers.AutoModelForCausalLM's class for this config"
    )


def _ignored(model: nn.Module, attribute: str, name: str) -> bool:
    return any(re.search(pattern, name) for pattern in getattr(model, attribute, None) or ())


def _some(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} keys ({shown}{', ...' if len(names) > limit else ''})"
