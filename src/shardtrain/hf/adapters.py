"""LoRA adapters on a model through peft: ``with_lora(model, {r: 16, ...})`` in ``configure_model()``.

peft wraps the model in place (``q_proj`` becomes ``q_proj.base_layer`` plus ``lora_A``/``lora_B``) and freezes
the rest. Under a sharding strategy the wrapped model is still on the meta device: the pretrained weights are
read into each rank's shard under peft's names (``shardtrain.hf.pretrained``), and the adapters initialised as
peft does on a device (``shardtrain.parallel.adapters``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from shardtrain.checkpoint.consolidate import _metadata, _read_tensor
from shardtrain.checkpoint.sharded import read_meta
from shardtrain.errors import CheckpointError, ConfigError, MissingDependencyError
from shardtrain.hf.pretrained import _architecture, require_transformers


def require_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise MissingDependencyError("peft", "LoRA adapters", extra="peft") from error
    return peft


#: the names a run config may give a dtype by
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_dtype(dtype: torch.dtype | str, option: str) -> torch.dtype:
    """``torch.bfloat16`` or one of ``DTYPES``' names; a ``ConfigError`` naming ``option`` otherwise."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"{option}={dtype!r} is not a floating-point dtype; use one of {', '.join(DTYPES)}")


def keep_frozen_in(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """Store ``model``'s frozen parameters (``requires_grad=False``) in ``dtype``; the trainable ones keep theirs.

    For a LoRA fine-tune: the base in bf16 (half its memory, and half of what each all-gather moves) while the
    adapters and their optimizer state stay fp32, as peft keeps them. On the meta device (sharding strategies) this
    only changes the dtype the weights are read into, so a bf16 checkpoint is read as it is stored. Call it after
    freezing (``with_lora`` does)."""
    dtype = parse_dtype(dtype, "frozen_dtype")
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model


def with_lora(
    model: nn.Module, options: Mapping[str, Any], *, frozen_dtype: torch.dtype | str | None = None
) -> nn.Module:
    """``peft.get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))``, with errors that name the fix:
    an option ``LoraConfig`` does not have, or ``target_modules`` that match no layer of ``model``.

    ``frozen_dtype`` (e.g. ``torch.bfloat16`` or ``"bf16"``): keep the frozen base in that dtype while the adapters
    train in the run's parameter dtype (``keep_frozen_in``)."""
    peft = require_peft()
    if frozen_dtype is not None:
        parse_dtype(frozen_dtype, "frozen_dtype")  # before peft builds anything
    fields = {field.name for field in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"lora: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an option of peft's LoraConfig; "
            "use its names, e.g. r, lora_alpha, lora_dropout, target_modules, modules_to_save"
        )
    config = peft.LoraConfig(**{"task_type": "CAUSAL_LM", **options})
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as error:
        if "not found in the base model" not in str(error) and "No modules were targeted" not in str(error):
            raise
        layers = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"lora: target_modules={options.get('target_modules')!r} match no layer of {type(model).__name__}; "
            f"its linear layers are named {', '.join(layers)}"
        ) from error
    return keep_frozen_in(wrapped, frozen_dtype) if frozen_dtype is not None else wrapped


def export_adapters(
    checkpoint: Path,
    output: Path,
    model_dir: Path,
    provenance: Mapping[str, Any],
    *,
    merge: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write a peft run's ``checkpoint`` as peft writes it: ``adapter_config.json`` and ``adapter_model.safetensors``
    (the trained adapters, and ``modules_to_save``), which ``PeftModel.from_pretrained(base, output)`` loads; or,
    with ``merge``, the model with the adapters merged into its weights (peft's ``merge_and_unload``), a directory
    ``AutoModelForCausalLM.from_pretrained`` loads. The peft model is rebuilt from the recorded adapter configs:
    on the meta device with only the adapters read (one process, adapters in memory), or, to merge, on the CPU
    from the pretrained directory, with every weight the checkpoint holds (the whole model in memory once)."""
    peft, transformers = require_peft(), require_transformers()
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    adapters = dict(provenance["adapters"])
    cls = _architecture(transformers, hf_config)
    if merge:  # the pretrained weights, in fp32 (the config may name the files' bf16), then what the run saved
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
    else:
        with torch.device("meta"):
            model = cls._from_config(hf_config, dtype=torch.float32)
    with torch.device("cpu" if merge else "meta"):
        peft_model = None
        for name, options in adapters.items():
            config = peft.PeftConfig.from_peft_type(**options)
            if peft_model is None:
                peft_model = peft.get_peft_model(model, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
    assert peft_model is not None
    stored = _metadata(checkpoint)
    key = (read_meta(checkpoint).get("modules") or ["module"])[0]
    prefix = f"{key}.{provenance.get('prefix', '')}"
    trained = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    absent = [name for name in trained if prefix + name not in stored]
    if absent:
        raise CheckpointError(
            f"{checkpoint} does not hold the adapters its run recorded (missing {', '.join(absent[:8])}); "
            "it was not saved by this run's model"
        )
    expected = peft_model.state_dict()
    differing = [
        f"{name}: checkpoint {tuple(stored[prefix + name].size)}, {model_dir.name} {tuple(expected[name].shape)}"
        for name in trained
        if tuple(stored[prefix + name].size) != tuple(expected[name].shape)
    ]
    if differing:
        raise CheckpointError(
            f"the adapters in {checkpoint} do not fit the model in {model_dir} (shapes differ for {len(differing)}: "
            f"{'; '.join(differing[:4])}); pass --hf-config the base model the run trained them on"
        )
    # Merging: every weight the checkpoint holds (all of them, unless it holds only the adapters: the frozen
    # rest is then the pretrained files' by construction).
    wanted = [name for name in peft_model.state_dict() if prefix + name in stored] if merge else trained
    tensors = {name: _read_tensor(checkpoint, prefix + name, stored[prefix + name]) for name in wanted}
    output.mkdir(parents=True, exist_ok=True)
    if merge:
        peft_model.load_state_dict(tensors, strict=False)
        merged = peft_model.merge_and_unload()
        if dtype is not None:
            merged.to(dtype)
        merged.config.dtype = dtype or torch.float32
        merged.save_pretrained(output, max_shard_size=max_shard_bytes, safe_serialization=True)
        return sorted(output.glob("*.safetensors"))
    peft_model.load_state_dict({n: t.to(dtype) if dtype else t for n, t in tensors.items()}, strict=False, assign=True)
    peft_model.save_pretrained(output, safe_serialization=True)
    return sorted(output.rglob("adapter_model.safetensors"))
