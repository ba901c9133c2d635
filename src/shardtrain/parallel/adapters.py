"""peft's adapter layers (LoRA) in delayed initialisation: initialised as peft initialises them on a real device.

A model built on the meta device and wrapped by ``peft.get_peft_model`` in ``configure_model()`` holds LoRA
layers whose ``lora_A``/``lora_B`` are meta tensors: peft's initialisation ran on nothing. When the strategy
materialises the model, each LoRA layer's adapters are initialised the way peft does it on a real device,
in the same order and from the same random stream, so that a seeded run starts from the same adapters under
every strategy: ``nn.Linear``'s own initialisation of ``lora_A`` and ``lora_B`` (their constructors), then
peft's ``reset_lora_parameters(adapter, init_lora_weights)`` (``lora_A`` drawn again, ``lora_B`` zeros).

Recognised by peft's own interface (a layer with ``lora_A`` and ``reset_lora_parameters``; the config in the
``peft_config`` of a module above it), so this module does not import peft. Initialisations computed from the
pretrained weights (PiSSA, OLoRA, LoftQ, EVA, DoRA's magnitudes) need those weights when the adapters are
made, and a sharding strategy reads them after initialising: refused, naming the fix.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from shardtrain.errors import ConfigError

#: ``init_lora_weights`` values that draw the adapters at random (peft's default True, and "gaussian").
RANDOM_INITS = (True, False, "gaussian")


def adapter_initialisers(root: nn.Module) -> dict[int, Callable[[], None]]:
    """For each peft LoRA layer under ``root`` and its ``lora_A``/``lora_B`` modules: id -> its initialisation."""
    configs: dict[str, Any] = {}
    for holder in root.modules():
        found = getattr(holder, "peft_config", None)
        if isinstance(found, dict):
            configs.update(found)
    initialisers: dict[int, Callable[[], None]] = {}
    for name, layer in root.named_modules():
        if not (
            callable(getattr(layer, "reset_lora_parameters", None))
            and isinstance(getattr(layer, "lora_A", None), nn.ModuleDict)
        ):
            continue
        adapters = list(layer.lora_A.keys())
        for adapter in adapters:
            config = configs.get(adapter)
            init = getattr(config, "init_lora_weights", True)
            if init not in RANDOM_INITS or getattr(config, "use_dora", False):
                what = "use_dora=True" if getattr(config, "use_dora", False) else f"init_lora_weights={init!r}"
                raise ConfigError(
                    f"{name}: peft's {what} computes the adapters from the pretrained weights when they are made, but "
                    "a sharding strategy builds the model on the meta device and reads the weights later; use "
                    "init_lora_weights=True or 'gaussian', or a strategy that builds on the device (single, ddp, "
                    "deepspeed stages 1-2) or delayed_init=False"
                )
            for holder in (layer.lora_A, layer.lora_B):
                if adapter in holder and callable(getattr(holder[adapter], "reset_parameters", None)):
                    initialisers[id(holder[adapter])] = holder[adapter].reset_parameters
        initialisers[id(layer)] = functools.partial(_reset_adapters, layer, adapters, configs)
    return initialisers


def _reset_adapters(layer: nn.Module, adapters: list[str], configs: dict[str, Any]) -> None:
    for adapter in adapters:
        layer.reset_lora_parameters(adapter, getattr(configs.get(adapter), "init_lora_weights", True))


def is_adapter_layer(module: nn.Module) -> bool:
    """A peft LoRA layer wrapping a layer it adapts (``base_layer``) with ``lora_A``/``lora_B`` per adapter."""
    return isinstance(getattr(module, "base_layer", None), nn.Module) and isinstance(
        getattr(module, "lora_A", None), nn.ModuleDict
    )


def adapter_tensor_parallel(name: str, layer: nn.Module, style: Any) -> list[tuple[str, nn.Module, Any]]:
    """``(name, module, style)`` that split a LoRA layer as ``style`` splits the layer it adapts, so that each
    rank's output is the one-process output's part: ``base_layer`` takes ``style``. Column-wise (the output
    features split): ``lora_B`` is split the same way and ``lora_A`` stays whole on every rank (its gradient is
    summed over the ranks by the split ``lora_B``'s input, as PyTorch's column-wise input does for any layer).
    Row-wise (the input features split): ``lora_A`` is split the same way (its output summed over the ranks),
    ``lora_B`` stays whole."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if getattr(layer, "lora_embedding_A", None) or not isinstance(style, (ColwiseParallel, RowwiseParallel)):
        raise ConfigError(
            f"{name}: a peft LoRA layer can be split column- or row-wise as a Linear layer; the tensor-parallel "
            f"style {type(style).__name__} (or LoRA on an embedding) is not supported: leave it out of "
            "target_modules, or out of the tensor-parallel plan"
        )
    kind = type(style)
    same = kind(
        input_layouts=style.input_layouts[0],
        output_layouts=style.output_layouts[0],
        use_local_output=style.use_local_output,
    )
    split = layer.lora_B if kind is ColwiseParallel else layer.lora_A
    targets = [(f"{name}.base_layer", layer.base_layer, style)]
    targets += [(f"{name}.{'lora_B' if kind is ColwiseParallel else 'lora_A'}.{a}", m, same) for a, m in split.items()]
    return targets
