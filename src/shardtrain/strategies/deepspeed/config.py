"""The DeepSpeed config a run uses: named options, a user's config file, and the Trainer's settings.

DeepSpeed is driven by one JSON-like dict. It is assembled here, in three layers, each later
layer winning over the earlier ones for the keys it sets:

1. ``config=``: a dict, or a path to a DeepSpeed JSON file (parsed here, with the line of a
   syntax error in the message). Everything DeepSpeed can do is reachable this way.
2. The named options of ``DeepSpeedStrategy`` (``stage``, ``offload_optimizer``, ...) that were
   *given*: an option left at ``None`` keeps the file's value, or DeepSpeed's default. Each key
   a given option overrides in the file is named in one warning.
3. What the Trainer owns, because its loop depends on it: precision, micro-batch size, gradient
   accumulation and clipping. ``"auto"`` values in the file are resolved silently; a different
   concrete value in the file is replaced, with a warning.

All checks run here, on plain values, before any process group exists.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shardtrain.errors import ConfigError
from shardtrain.strategies.base import TrainingSettings

OffloadDevice = Literal["cpu", "nvme"]
_OFFLOAD_DEVICES = ("cpu", "nvme")


@dataclass(kw_only=True, slots=True)
class DeepSpeedOptions:
    """The named options of ``DeepSpeedStrategy``; ``None`` means "not given"."""

    stage: int | None = None
    offload_optimizer: bool | None = None
    offload_parameters: bool | None = None
    offload_optimizer_device: str | None = None
    offload_params_device: str | None = None
    nvme_path: str | None = None
    pin_memory: bool | None = None
    allgather_bucket_size: int | None = None
    reduce_bucket_size: int | None = None
    overlap_comm: bool | None = None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed JSON config file as a dict; a syntax error names the file, line and column."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config file {str(file)!r} does not exist")
    text = file.read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        line = text.splitlines()[error.lineno - 1] if 0 < error.lineno <= len(text.splitlines()) else ""
        raise ConfigError(
            f"DeepSpeed config file {str(file)!r} is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}:\n    {line}\n    {' ' * (error.colno - 1)}^"
        ) from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"DeepSpeed config file {str(file)!r} must hold a JSON object, got {type(parsed).__name__}")
    return parsed


def user_config(config: dict[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        return read_config_file(config)
    raise ConfigError(f"DeepSpeed config= takes a dict or a path to a JSON file, got {type(config).__name__}")


def check_options(options: DeepSpeedOptions) -> None:
    """Reject named options that cannot work, with the fix in the message."""
    if options.stage is not None and (
        not isinstance(options.stage, int) or isinstance(options.stage, bool) or not 0 <= options.stage <= 3
    ):
        raise ConfigError(f"DeepSpeed ZeRO stage must be 0, 1, 2 or 3, got {options.stage!r} (there is no stage 4)")
    for name in ("offload_optimizer_device", "offload_params_device"):
        value = getattr(options, name)
        if value is not None and value not in _OFFLOAD_DEVICES:
            raise ConfigError(f"{name} must be 'cpu' or 'nvme', got {value!r}")
    for name in ("allgather_bucket_size", "reduce_bucket_size"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"{name} must be a positive number of elements, got {value!r}")


def build_config(
    options: DeepSpeedOptions,
    config: dict[str, Any] | str | os.PathLike | None,
    training: TrainingSettings,
    *,
    precision: str = "32-true",
    world_size: int = 1,
    device_type: str = "cpu",
) -> dict[str, Any]:
    """The complete DeepSpeed config for this run (see the module docstring for precedence): the loop's
    ``training`` settings, the run's ``precision`` and ``world_size`` decide the keys DeepSpeed must agree on."""
    check_options(options)
    result = user_config(config)
    zero = result.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"'zero_optimization' in the DeepSpeed config must be an object, got {zero!r}")
    overridden: list[str] = []

    def put(section: dict[str, Any], key: str, value: Any, where: str) -> None:
        if value is None:
            return
        if key in section and section[key] != value:
            overridden.append(f"{where}{key}: {section[key]!r} -> {value!r}")
        section[key] = value

    put(zero, "stage", options.stage, "zero_optimization.")
    zero.setdefault("stage", 2)
    # Lightning's default: ZeRO takes any torch optimizer (SGD too), not only the ones DeepSpeed has tested.
    result.setdefault("zero_allow_untested_optimizer", True)
    put(zero, "allgather_bucket_size", _int(options.allgather_bucket_size), "zero_optimization.")
    put(zero, "reduce_bucket_size", _int(options.reduce_bucket_size), "zero_optimization.")
    put(zero, "overlap_comm", options.overlap_comm, "zero_optimization.")
    pin_memory = options.pin_memory if options.pin_memory is not None else (device_type == "cuda")
    _offload(
        zero, "offload_optimizer", options.offload_optimizer, options.offload_optimizer_device, options, pin_memory, put
    )
    _offload(zero, "offload_param", options.offload_parameters, options.offload_params_device, options, pin_memory, put)
    if overridden:
        warnings.warn(
            "DeepSpeedStrategy options override these keys of the config file: "
            + "; ".join(overridden)
            + ". Named options win; leave an option out to keep the file's value.",
            stacklevel=3,
        )
    _write_trainer_settings(result, training, precision, world_size)
    check_config(result)
    return result


def _int(value: int | float | None) -> int | None:
    return None if value is None else int(value)


def _offload(
    zero: dict[str, Any],
    key: str,
    enabled: bool | None,
    device: str | None,
    options: DeepSpeedOptions,
    pin_memory: bool,
    put: Any,
) -> None:
    """Write ``offload_optimizer`` / ``offload_param`` from the named options that were given."""
    if enabled is False:
        if key in zero:
            put(zero, key, {"device": "none"}, "zero_optimization.")
        return
    if not enabled and device is None:
        if key in zero and options.nvme_path is not None and zero[key].get("device") == "nvme":
            zero[key].setdefault("nvme_path", options.nvme_path)
        return
    section = zero.setdefault(key, {})
    put(section, "device", device or section.get("device", "cpu"), f"zero_optimization.{key}.")
    if section["device"] == "nvme":
        put(section, "nvme_path", options.nvme_path, f"zero_optimization.{key}.")
    section.setdefault("pin_memory", pin_memory)
    if options.pin_memory is not None:
        put(section, "pin_memory", options.pin_memory, f"zero_optimization.{key}.")


def _write_trainer_settings(
    config: dict[str, Any], training: TrainingSettings, precision: str, world_size: int
) -> None:
    replaced: list[str] = []

    def own(section: dict[str, Any], key: str, value: Any, where: str = "") -> None:
        if key in section and section[key] != "auto" and section[key] != value:
            replaced.append(f"{where}{key}: {section[key]!r} -> {value!r}")
        section[key] = value

    micro = (
        training.micro_batch_size
        or (
            config.get("train_micro_batch_size_per_gpu")
            if config.get("train_micro_batch_size_per_gpu") != "auto"
            else None
        )
        or 1
    )
    own(config, "train_micro_batch_size_per_gpu", micro)
    own(config, "gradient_accumulation_steps", training.accumulate_grad_batches)
    config["train_batch_size"] = micro * training.accumulate_grad_batches * world_size
    # Always written: DeepSpeed's own default is to clip at 1.0, which would silently change training.
    own(config, "gradient_clipping", float(training.gradient_clip_val or 0.0))
    low = {"bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16"}.get(precision)
    for section_name in ("bf16", "fp16"):
        section = config.get(section_name)
        if isinstance(section, dict):
            enabled = section_name == low
            if section.get("enabled", False) not in ("auto", enabled):
                replaced.append(f"{section_name}.enabled: {section.get('enabled')!r} -> {enabled!r}")
            section["enabled"] = enabled
    if low is not None:
        config.setdefault(low, {})["enabled"] = True
    if replaced:
        warnings.warn(
            "the Trainer's settings (precision, batch size, accumulate_grad_batches, gradient_clip_val) "
            "replace these keys of the DeepSpeed config: " + "; ".join(replaced),
            stacklevel=4,
        )


def evaluation_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of an engine set up without an optimizer (evaluation), as Lightning's DeepSpeed inference: the
    batch size, the precision sections and, at ZeRO-3 only (partitioned parameters), ``zero_optimization``;
    ZeRO-1/2 refuse to start without an optimizer, and partition nothing evaluation uses."""
    kept = {"train_micro_batch_size_per_gpu": config.get("train_micro_batch_size_per_gpu", 1)}
    kept.update({name: config[name] for name in ("bf16", "fp16") if name in config})
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3:
        kept["zero_optimization"] = zero
        kept["zero_allow_untested_optimizer"] = config.get("zero_allow_untested_optimizer", True)
    return kept


#: Where pipeline parallelism is, for strategies that do not have it.
PIPELINE_HINT = (
    "strategy='model_parallel' with pipeline_parallel_size=N: stages of your unchanged model on "
    "torch.distributed.pipelining (see docs/pipeline_parallel.md)"
)


def check_config(config: dict[str, Any]) -> None:
    """Reject a config DeepSpeed would accept but run differently from what it says."""
    if "pipeline" in config:
        raise ConfigError(
            f"the DeepSpeed config asks for pipeline parallelism ('pipeline': {config['pipeline']!r}), which needs the "
            "model rewritten as a deepspeed PipelineModule and DeepSpeed's own training loop; shardtrain does not drive "
            f"it. Use {PIPELINE_HINT}"
        )
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 3:
        raise ConfigError(f"DeepSpeed ZeRO stage must be 0, 1, 2 or 3, got {stage!r} (there is no stage 4)")
    optimizer_device = _device(zero.get("offload_optimizer"))
    param_device = _device(zero.get("offload_param"))
    if param_device not in ("none", None) and stage < 3:
        raise ConfigError(
            f"offloading parameters needs ZeRO stage 3 (stage {stage} keeps every parameter on every device); "
            "use stage=3, or offload only the optimizer (offload_optimizer=True)"
        )
    if optimizer_device not in ("none", None) and stage == 0:
        raise ConfigError("offloading the optimizer needs ZeRO stage 1, 2 or 3; stage 0 does not partition it")
    if optimizer_device == "nvme" and stage < 3:
        raise ConfigError(
            f"offload_optimizer_device='nvme' needs ZeRO stage 3; at stage {stage} DeepSpeed would silently offload "
            "to CPU memory instead. Use stage=3, or offload_optimizer_device='cpu'"
        )
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if _device(section) == "nvme" and not section.get("nvme_path"):
            raise ConfigError(
                f"zero_optimization.{key} goes to 'nvme' but no nvme_path is set; pass nvme_path='/local/fast/disk' "
                "(a directory on a local SSD where DeepSpeed writes its swap files)"
            )
    for key in ("bf16", "fp16"):
        if (
            isinstance(config.get(key), dict)
            and config[key].get("enabled") is True
            and config.get("bf16" if key == "fp16" else "fp16", {}).get("enabled") is True
        ):
            raise ConfigError(
                "the DeepSpeed config enables both bf16 and fp16; choose one through the Trainer's precision"
            )


def _device(section: Any) -> str | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"DeepSpeed offload settings must be objects like {{'device': 'cpu'}}, got {section!r}")
    device = section.get("device", "none")
    if device not in ("none", "cpu", "nvme"):
        raise ConfigError(f"DeepSpeed offload device must be 'none', 'cpu' or 'nvme', got {device!r}")
    return device


def offload_nvme_paths(config: dict[str, Any]) -> list[str]:
    """The directories DeepSpeed will write swap files to."""
    zero = config.get("zero_optimization", {})
    return [
        zero[key]["nvme_path"] for key in ("offload_optimizer", "offload_param") if _device(zero.get(key)) == "nvme"
    ]


def offloads_optimizer(config: dict[str, Any]) -> bool:
    return _device(config.get("zero_optimization", {}).get("offload_optimizer")) in ("cpu", "nvme")
