"""What ``Engine.save`` and ``Engine.load`` do with a state dict: split it for storage, and put it back.

Modules and optimizers become tensors keyed by parameter names (the strategy gives each rank its
shards); tensors are stored as they are; objects with ``state_dict()`` (schedulers, callbacks) and
plain values go to ``meta.json`` as JSON; every rank's RNG state is stored too, and restored when
the run has as many ranks as saved it. Storage itself is ``checkpoint.sharded`` (DCP, atomic).

``trainable_only``: a module's trainable parameters only (LoRA adapters; the frozen rest comes from
where the run read it). ``meta.json`` lists such modules under ``trainable_only``; loading one fills the
module's trainable parameters and leaves the rest as set up, after checking that they are the saved ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from shardtrain.checkpoint.sharded import (
    PendingSave,
    load_sharded,
    read_meta,
    save_sharded,
    save_sharded_async,
    saved_keys,
)
from shardtrain.errors import CheckpointError
from shardtrain.seed import restore_rng, rng_tensors
from shardtrain.strategies.base import Strategy
from shardtrain.engine.wrapper import EngineModule, EngineOptimizer


class TrainingStateIO:
    """Saves and loads state dicts of set-up modules, optimizers, tensors and plain values for one strategy.

    ``modules`` are the set-up modules; ``optimizer_owners`` maps ``id(optimizer)`` to the module
    it updates where its parameters cannot tell (ZeRO flattens them). The strategy keys optimizer
    state by its module's parameter names.
    """

    def __init__(
        self, strategy: Callable[[], Strategy], modules: list[nn.Module], optimizer_owners: dict[int, nn.Module]
    ) -> None:
        self._strategy = strategy
        self.modules = modules
        self.optimizer_owners = optimizer_owners
        self._pending: PendingSave | None = None

    @property
    def strategy(self) -> Strategy:
        """The run's strategy now (``strategy="auto"`` may replace it before set-up)."""
        return self._strategy()

    def wait(self) -> Path | None:
        """Block until an asynchronous save in flight is committed; returns its path (or None)."""
        pending, self._pending = self._pending, None
        return pending.wait() if pending is not None else None

    def module_of(self, optimizer: Optimizer) -> nn.Module:
        """The set-up module whose parameters ``optimizer`` updates."""
        if id(optimizer) in self.optimizer_owners:
            return self.optimizer_owners[id(optimizer)]
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for module in self.modules:
            if any(id(p) in params for p in module.parameters()):
                return module
        raise CheckpointError(
            "the optimizer's parameters belong to no module set up with this engine; call engine.setup(model, optimizer) first"
        )

    def save(
        self,
        path: str | os.PathLike,
        state: dict[str, Any],
        *,
        asynchronous: bool = False,
        on_commit: Callable[[Path], None] | None = None,
        trainable_only: bool = False,
    ) -> Path:
        """Write ``state`` (after any save in flight). Every rank must call this; the directory appears
        atomically when all have finished, then ``on_commit(path)`` runs on rank 0. With
        ``asynchronous=True`` it returns once the state is copied to CPU memory and the files are
        written in the background; at most one save is in flight (the next save, a load or
        ``wait()`` waits for it)."""
        self.wait()
        barrier = self.strategy.barrier
        rank = self.strategy.global_rank
        tensors: dict[str, Any] = {}
        plain: dict[str, Any] = {}
        for key, value in state.items():
            self._split(key, value, tensors, plain)
        tensors["rng"] = {f"rank{rank}": rng_tensors()}
        modules = [key for key, value in state.items() if isinstance(value, nn.Module)]
        meta = {
            "world_size": self.strategy.world_size,
            "strategy": self.strategy.name,
            "modules": modules,
            "state": plain,
        }
        if trainable_only:
            for key in modules:
                trainable = trainable_names(state[key])
                if not trainable:
                    raise CheckpointError(f"trainable_only: {key!r} has no trainable parameters to save")
                tensors[key] = {name: tensor for name, tensor in tensors[key].items() if name in trainable}
            meta["trainable_only"] = modules
        if asynchronous:
            self._pending = save_sharded_async(path, tensors, meta, rank=rank, barrier=barrier, on_commit=on_commit)
            return Path(path)
        return save_sharded(path, tensors, meta, rank=rank, barrier=barrier, on_commit=on_commit)

    def load(self, path: str | os.PathLike, state: dict[str, Any], strict: bool = True) -> dict[str, Any]:
        """Fill ``state`` in place from ``path``; returns saved plain entries that ``state`` did not name."""
        self.wait()
        rank = self.strategy.global_rank
        meta = read_meta(path)
        saved_plain: dict[str, Any] = meta["state"]
        on_disk = saved_keys(path)
        partial = set(meta.get("trainable_only") or ())
        tensors: dict[str, Any] = {}
        plain_targets: dict[str, Any] = {}
        for key, value in state.items():
            in_tensors = any(k == key or k.startswith(key + ".") for k in on_disk)
            if not in_tensors and key not in saved_plain:
                if strict:
                    raise CheckpointError(
                        f"checkpoint {path} has no entry {key!r}; it holds {sorted(saved_plain) + sorted({k.split('.')[0] for k in on_disk})}"
                    )
                continue
            self._split(key, value, tensors, plain_targets)
            if key in partial and key in tensors:
                tensors[key] = _saved_trainable(path, key, value, tensors[key], on_disk)
        same_layout = meta["world_size"] == self.strategy.world_size
        if same_layout:
            tensors["rng"] = {f"rank{rank}": rng_tensors()}
        modules = tuple(key for key, value in state.items() if isinstance(value, nn.Module) and key in tensors)
        load_sharded(path, tensors, strict_prefixes=modules if strict else ())
        for key, value in state.items():
            if key in tensors:
                self._apply_tensors(value, tensors[key], strict and key not in partial)
            elif key in saved_plain:
                state[key] = _apply_plain(value, saved_plain[key], f"{path}: {key!r}")
        if same_layout:
            restore_rng(tensors["rng"][f"rank{rank}"])
        return {key: value for key, value in saved_plain.items() if key not in state}

    def _split(self, key: str, value: Any, tensors: dict[str, Any], plain: dict[str, Any]) -> None:
        """Put ``value``'s state under ``key`` in ``tensors`` (sharded) or ``plain`` (JSON)."""
        if isinstance(value, nn.Module):
            tensors[key] = self.strategy.module_state_dict(_user_module(value), full=False)
        elif isinstance(value, Optimizer):
            raw = _user_optimizer(value)
            tensors[key] = self.strategy.optimizer_state_dict(self.module_of(raw), raw, full=False)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(item, Optimizer) for item in value):
            nested: dict[str, Any] = {}
            for index, item in enumerate(value):
                self._split(str(index), item, nested, {})
            tensors[key] = nested
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, (list, tuple)) and any(callable(getattr(item, "state_dict", None)) for item in value):
            plain[key] = [item.state_dict() for item in value]
        elif callable(getattr(value, "state_dict", None)):
            plain[key] = value.state_dict()
        else:
            plain[key] = value

    def _apply_tensors(self, target: Any, loaded: Any, strict: bool) -> None:
        if isinstance(target, nn.Module):
            self.strategy.load_module_state_dict(_user_module(target), loaded, strict=strict, full=False)
        elif isinstance(target, Optimizer):
            raw = _user_optimizer(target)
            self.strategy.load_optimizer_state_dict(self.module_of(raw), raw, loaded, full=False)
        elif isinstance(target, (list, tuple)):
            for index, item in enumerate(target):
                self._apply_tensors(item, loaded[str(index)], strict)
        # plain tensors were filled in place by DCP


def trainable_names(module: nn.Module) -> set[str]:
    """State-dict names of ``module``'s parameters that train (``requires_grad``)."""
    return {name for name, parameter in _user_module(module).named_parameters() if parameter.requires_grad}


def _saved_trainable(path: Any, key: str, module: nn.Module, tensors: dict[str, Any], on_disk: set[str]) -> dict:
    """The part of ``module``'s state a trainable-only checkpoint fills: its trainable parameters, which must be
    the saved ones (an adapter checkpoint of another configuration would leave some untrained, or unread)."""
    saved = {name.removeprefix(f"{key}.") for name in on_disk if name.startswith(f"{key}.")}
    trainable = trainable_names(module)
    if trainable != saved:
        missing, extra = sorted(trainable - saved), sorted(saved - trainable)
        raise CheckpointError(
            f"{path} holds only the trainable parameters of {key!r} (adapters), and they are not this model's: "
            + "; ".join(
                part
                for part in (
                    f"the model trains {len(missing)} it does not hold ({', '.join(missing[:4])})" if missing else "",
                    f"it holds {len(extra)} the model does not train ({', '.join(extra[:4])})" if extra else "",
                )
                if part
            )
            + ". Build the model with the run's adapter configuration"
        )
    return {name: tensor for name, tensor in tensors.items() if name in trainable}


def _user_module(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, EngineModule) else module


def _user_optimizer(optimizer: Optimizer) -> Optimizer:
    return optimizer.optimizer if isinstance(optimizer, EngineOptimizer) else optimizer


def _apply_plain(target: Any, saved: Any, where: str) -> Any:
    if isinstance(target, (list, tuple)) and any(callable(getattr(item, "load_state_dict", None)) for item in target):
        if len(target) != len(saved):
            raise CheckpointError(
                f"{where} holds {len(saved)} states but {len(target)} objects were given to load them into"
            )
        for item, item_state in zip(target, saved):
            item.load_state_dict(item_state)
        return target
    if callable(getattr(target, "load_state_dict", None)):
        target.load_state_dict(saved)
        return target
    return saved
