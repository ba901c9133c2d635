"""Lightning's hyperparameters: ``save_hyperparameters()``, ``hparams``, and what a checkpoint records of them.

``save_hyperparameters`` reads the arguments of the ``__init__`` that calls it (and of the subclasses' ``__init__``
that called that one), as Lightning does, so that ``load_from_checkpoint`` can build the object again. A checkpoint
stores them as JSON, never pickled: a value JSON cannot hold (a module, a function, a tensor) is left out, and the
checkpoint names it and why, so that loading asks for it (``load_from_checkpoint(path, name=value)``).
"""

from __future__ import annotations

import copy
import inspect
import json
import types
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from shardtrain.errors import ConfigError

#: Keys of a checkpoint's JSON state (Lightning's names where it has them).
HPARAMS_KEY = "hyper_parameters"
HPARAMS_NAME_KEY = "hparams_name"
LEFT_OUT_KEY = "hyper_parameters_left_out"


class AttributeDict(dict):
    """A dict whose keys are attributes too (``hparams.lr``), as Lightning's ``AttributeDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"'AttributeDict' object has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class HyperparametersMixin:
    """``save_hyperparameters``, ``hparams`` and ``hparams_initial`` for ``TrainModule`` and ``DataModule``."""

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: Sequence[str] | str | None = None,
        frame: types.FrameType | None = None,
        logger: bool = True,
    ) -> None:
        """Record hyperparameters in ``self.hparams`` (and in checkpoints, and for the loggers when ``logger``):
        with no arguments, every argument of ``__init__`` (but ``ignore``d ones); with names, those arguments;
        with one dict or ``Namespace``, its items."""
        self._log_hyperparams = logger
        if frame is None:
            frame = inspect.currentframe().f_back  # type: ignore[union-attr]
        if len(args) == 1 and not isinstance(args[0], str) and not args[0]:
            return  # an empty container
        ignored = [ignore] if isinstance(ignore, str) else [name for name in (ignore or []) if isinstance(name, str)]
        init_args = {k: v for k, v in _init_arguments(frame, self).items() if k not in ignored}
        containers = [arg for arg in args if not isinstance(arg, str)]
        if not args:
            hparams: Any = init_args
            self._hparams_name = "kwargs" if hparams else None
        elif len(containers) == 1:
            hparams = containers[0]
            self._hparams_name = next((k for k, v in init_args.items() if v is hparams or v == hparams), None)
        else:
            missing = [arg for arg in args if isinstance(arg, str) and arg not in init_args]
            if missing:
                raise ConfigError(
                    f"save_hyperparameters({', '.join(map(repr, missing))}): {type(self).__name__}.__init__ has no "
                    f"such argument; it has {sorted(init_args)}"
                )
            hparams = {arg: init_args[arg] for arg in args if isinstance(arg, str)}
            self._hparams_name = "kwargs"
        if isinstance(hparams, Namespace):
            hparams = vars(hparams)
        if not isinstance(hparams, Mapping):
            raise ConfigError(f"save_hyperparameters takes names, a dict or a Namespace, got {type(hparams).__name__}")
        self.hparams.update(hparams)
        for name in ignored:
            self.hparams.pop(name, None)
        for name, value in self.hparams.items():
            if isinstance(value, nn.Module):
                warnings.warn(
                    f"hyperparameter {name!r} is an nn.Module: its weights are in the checkpoint already, and it is "
                    f"left out of the recorded hyperparameters; ignore it: save_hyperparameters(ignore=[{name!r}])",
                    stacklevel=2,
                )
        self._hparams_initial = copy.deepcopy(self.hparams)

    @property
    def hparams(self) -> AttributeDict:
        """The hyperparameters, mutable (``self.hparams.lr = 0.1`` is recorded too)."""
        if "_hparams" not in self.__dict__:
            self.__dict__["_hparams"] = AttributeDict()
        return self.__dict__["_hparams"]

    @property
    def hparams_initial(self) -> AttributeDict:
        """A copy of the hyperparameters as ``save_hyperparameters`` recorded them (what the loggers get)."""
        return copy.deepcopy(self.__dict__.get("_hparams_initial", AttributeDict()))


def _init_arguments(frame: types.FrameType | None, owner: Any) -> dict[str, Any]:
    """The arguments of the ``__init__`` running in ``frame`` on ``owner``, and of every ``__init__`` of ``owner``
    that called it (a subclass calling ``super().__init__``), the most derived class's values winning."""
    collected: list[dict[str, Any]] = []
    while frame is not None:
        if frame.f_code.co_name == "__init__" and frame.f_locals.get(_self_name(frame)) is owner:
            collected.append(_arguments_of(frame))
        elif collected:
            break
        frame = frame.f_back
    arguments: dict[str, Any] = {}
    for level in collected:  # innermost (the caller of save_hyperparameters) first: outer levels override
        arguments.update(level)
    return arguments


def _self_name(frame: types.FrameType) -> str:
    return frame.f_code.co_varnames[0] if frame.f_code.co_argcount else "self"


def _arguments_of(frame: types.FrameType) -> dict[str, Any]:
    code, values = frame.f_code, frame.f_locals
    names = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])[1:]  # without self
    arguments = {name: values[name] for name in names if name in values}
    flags = code.co_flags
    position = code.co_argcount + code.co_kwonlyargcount
    if flags & inspect.CO_VARARGS:
        position += 1  # *args: positional values without names, not recorded (Lightning drops them too)
    if flags & inspect.CO_VARKEYWORDS:
        arguments.update(values.get(code.co_varnames[position], {}))
    return arguments


def jsonable(hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The hyperparameters JSON can hold, and the names of those it cannot with why (never pickled)."""
    kept: dict[str, Any] = {}
    left_out: dict[str, str] = {}
    for name, value in hparams.items():
        if isinstance(value, Path):
            value = str(value)
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError):
            left_out[name] = f"a {type(value).__module__}.{type(value).__qualname__}, which JSON cannot hold"
            continue
        kept[name] = value
    return kept, left_out


def checkpoint_entries(owner: Any, prefix: str = "") -> dict[str, Any]:
    """What a checkpoint records of ``owner``'s hyperparameters (nothing when it saved none)."""
    hparams = owner.__dict__.get("_hparams")
    if not hparams:
        return {}
    kept, left_out = jsonable(hparams)
    if left_out and not owner.__dict__.get("_warned_left_out"):
        owner.__dict__["_warned_left_out"] = True
        warnings.warn(
            f"{type(owner).__name__}'s hyperparameters {sorted(left_out)} are not recorded in checkpoints (JSON cannot "
            "hold them, and checkpoints never hold pickled objects); load_from_checkpoint will ask for them",
            stacklevel=3,
        )
    return {
        f"{prefix}{HPARAMS_KEY}": kept,
        f"{prefix}{LEFT_OUT_KEY}": left_out,
        f"{prefix}{HPARAMS_NAME_KEY}": owner.__dict__.get("_hparams_name"),
    }


def constructor_arguments(cls: type, saved: Mapping[str, Any], given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The keyword arguments that build ``cls`` again from a checkpoint's JSON state ``saved`` (one prefix's
    entries, see ``checkpoint_entries``) and the ``given`` overrides, as Lightning's ``load_from_checkpoint``."""
    hparams = dict(saved.get(HPARAMS_KEY) or {})
    left_out = dict(saved.get(LEFT_OUT_KEY) or {})
    hparams.update(given)
    missing = sorted(name for name in left_out if name not in given)
    if missing:
        reasons = "; ".join(f"{name}: {left_out[name]}" for name in missing)
        raise ConfigError(
            f"{where} did not record the hyperparameters {missing} ({reasons}): give them to "
            f"{cls.__name__}.load_from_checkpoint(path, {missing[0]}=...)"
        )
    parameters = inspect.signature(cls.__init__).parameters
    name = saved.get(HPARAMS_NAME_KEY)
    if name and name != "kwargs" and name in parameters:
        return {name: AttributeDict(hparams)}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return hparams
    return {key: value for key, value in hparams.items() if key in parameters}


def merged_for_loggers(module: Any, datamodule: Any) -> dict[str, Any] | None:
    """What the Trainer gives the loggers' ``log_hyperparams`` (Lightning's rule): the module's and the DataModule's
    initial hyperparameters, merged; the same key with different values is an error."""
    sources = [
        owner.hparams_initial
        for owner in (module, datamodule)
        if owner is not None and owner.__dict__.get("_log_hyperparams", False)
    ]
    if not sources:
        return None
    if len(sources) == 2:
        clashing = sorted(k for k in sources[0].keys() & sources[1].keys() if not _same(sources[0][k], sources[1][k]))
        if clashing:
            raise ConfigError(
                f"the hyperparameters {clashing} are in both the module's and the DataModule's hparams with different "
                "values; rename one, or leave it out with save_hyperparameters(ignore=...)"
            )
    merged: dict[str, Any] = {}
    for source in sources:
        merged.update(source)
    return merged


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # tensors and the like: the same object only
        return a is b
