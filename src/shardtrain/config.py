"""Run configuration: one YAML file (or dotted command-line options) → Trainer, strategy, model, data.

The options are read from the signatures of ``Trainer``, of the strategy classes, and of the
model and data classes named by ``class_path``, so the file format cannot drift from the
Python API. Parsing and type checking use jsonargparse (the library under Lightning's CLI: it
understands dataclasses, ``class_path``/``init_args`` and dotted overrides); we add the
strategy group, "did you mean" suggestions, and checks that run before any process starts.

A run config::

    trainer:            # any Trainer argument
      devices: 2
      max_steps: 200
      callbacks:        # Callback classes: shardtrain's by name, your own by import path
        - class_path: ThroughputMonitor
        - class_path: ModelCheckpoint
          init_args: {every_n_train_steps: 100}
      logger:           # true (default_root_dir/metrics.csv), false, or Logger classes
        - class_path: CSVLogger
        - class_path: TensorBoardLogger
    strategy:           # a registered name, then that strategy's options
      name: fsdp
      sharding_strategy: SHARD_GRAD_OP
    model:              # a TrainModule subclass
      class_path: examples.gpt.model.GPTModule
      init_args: {learning_rate: 0.002}
    data:               # a DataModule subclass (or the model's own *_dataloader hooks)
      class_path: examples.gpt.data.CorpusData
    ckpt_path: null

``trainer.callbacks`` and ``trainer.logger`` are lists of ``class_path``/``init_args`` entries, as
in Lightning's CLI; on the command line ``--trainer.callbacks+ ThroughputMonitor`` appends one and
``--trainer.callbacks.prog_bar false`` sets an option of the last one. A logger whose ``save_dir``
is not given writes under ``trainer.default_root_dir``, as Lightning's CLI does.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from shardtrain.callbacks import Callback
from shardtrain.datamodule import DataModule
from shardtrain.errors import ConfigError, StrategyError
from shardtrain.loggers import Logger
from shardtrain.module import TrainModule
from shardtrain.strategies import available_strategies, create_strategy
from shardtrain.strategies.registry import strategy_factory
from shardtrain.trainer.trainer import Trainer
from shardtrain.trainer.arguments import TrainerArguments

_TRAINER_SKIP = {"strategy"}


def build_parser(command: str) -> ArgumentParser:
    """The parser of ``shardtrain <command>``: Trainer options, strategy, model, data, ckpt_path."""
    parser = ArgumentParser(
        prog=f"shardtrain {command}",
        exit_on_error=False,
        description=f"shardtrain {command}: run from a config file and/or options",
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="a run config YAML file (options given after it override it)"
    )
    parser.add_class_arguments(TrainerArguments, "trainer", skip=_TRAINER_SKIP, instantiate=False)
    parser.add_argument(
        "--strategy",
        type=dict,
        default={"name": "auto"},
        help="{name: <registered strategy>, <option>: <value>, ...}; --strategy.<option> VALUE sets one",
    )
    parser.add_subclass_arguments(TrainModule, "model", required=True)
    parser.add_subclass_arguments(DataModule, "data", required=False)
    parser.add_argument(
        "--ckpt_path",
        type=str | None,
        default=None,
        help="resume from this checkpoint ('last', a directory, or consolidated weights)",
    )
    return parser


def parse(command: str, argv: list[str]) -> Namespace:
    """Parse and check a run config; every error is a ConfigError that names the fix."""
    argv, strategy_overrides = _split_strategy_overrides(argv)
    parser = build_parser(command)
    try:
        config = parser.parse_args(argv)
        given = parser.parse_args(argv, defaults=False)  # what the user wrote, to tell it from defaults
    except Exception as error:  # jsonargparse's ArgumentError
        raise ConfigError(_explain(str(error), parser, argv)) from None
    _loggers_default_to_root_dir(config, given)
    strategy = dict(config.strategy or {})
    strategy.update(strategy_overrides)
    config.strategy = strategy
    check_strategy(strategy)
    return config


def check_strategy(strategy: dict[str, Any]) -> None:
    name = str(strategy.get("name", "auto")).lower()  # names are case-insensitive, as in Trainer(strategy=...)
    if name != "auto" and name not in available_strategies():
        raise StrategyError(
            f"unknown strategy {name!r} in the config's strategy.name; choose one of: auto, {', '.join(available_strategies())}"
        )
    options = {key: value for key, value in strategy.items() if key != "name"}
    if name == "auto" and options:
        raise StrategyError(
            f"strategy options {sorted(options)} need a named strategy; set strategy.name (one of {', '.join(available_strategies())})"
        )
    if name == "auto" or not options:
        return
    factory = strategy_factory(name)
    parameters = list(inspect.signature(factory).parameters.values())
    names = {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    passthrough = getattr(factory, "passthrough_options_of", None)  # where **kwargs go, e.g. DistributedDataParallel
    if takes_any and passthrough is not None:
        names |= {
            p.name for p in inspect.signature(passthrough).parameters.values() if p.name not in ("self", "module")
        }
        takes_any = False
    for key in options:
        if key not in names and not takes_any:
            hint = difflib.get_close_matches(key, names, n=1)
            raise StrategyError(
                f"strategy option {key!r} does not belong to strategy {name!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Its options are: {', '.join(sorted(names))}"
            )


def instantiate(
    config: Namespace, parser: ArgumentParser | None = None
) -> tuple[Trainer, TrainModule, DataModule | None]:
    """Build the Trainer (checks everything before any process starts), the model and the data."""
    parser = parser or build_parser("fit")
    objects = parser.instantiate(config)
    strategy = dict(config.strategy)
    name = strategy.pop("name", "auto")
    trainer_kwargs = dict(vars(objects.trainer)) if isinstance(objects.trainer, Namespace) else dict(objects.trainer)
    trainer = Trainer(
        **trainer_kwargs, strategy=name if name == "auto" and not strategy else create_strategy(name, **strategy)
    )
    trainer.run_config = to_plain(config)
    return trainer, objects.model, objects.data


def to_plain(config: Namespace) -> dict[str, Any]:
    plain = config.clone().as_dict()
    plain.pop("config", None)
    plain.pop("__path__", None)
    return plain


def dump(config: Namespace) -> str:
    """The resolved config as YAML (defaults included); fed back with --config it reproduces the run."""
    return yaml.safe_dump(to_plain(config), sort_keys=False)


def write_resolved_config(config: Namespace, directory: str | os.PathLike) -> Path:
    path = Path(directory) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(config))
    return path


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, Namespace):
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def _loggers_default_to_root_dir(config: Namespace, given: Namespace) -> None:
    """A configured logger without its own ``save_dir`` writes under ``trainer.default_root_dir``."""
    given_loggers = _as_list(given.get("trainer.logger"))
    for index, entry in enumerate(_as_list(config.trainer.logger)):
        init_args = entry.get("init_args")
        if init_args is None or "save_dir" not in init_args or init_args.save_dir is not None:
            continue
        written = given_loggers[index].get("init_args") if index < len(given_loggers) else None
        if written is None or "save_dir" not in written:
            init_args.save_dir = str(config.trainer.default_root_dir)


def _split_strategy_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``--strategy.<option> VALUE`` pairs, taken out of argv (values read as YAML scalars)."""
    rest: list[str] = []
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        item = argv[index]
        if item.startswith("--strategy."):
            key, _, value = item[len("--strategy.") :].partition("=")
            if not _:
                if index + 1 >= len(argv):
                    raise ConfigError(f"{item} needs a value")
                value = argv[index + 1]
                index += 1
            overrides[key] = yaml.safe_load(value)
        else:
            rest.append(item)
        index += 1
    return rest, overrides


def _explain(message: str, parser: ArgumentParser, argv: list[str]) -> str:
    """jsonargparse's message, with the config file named and a 'did you mean' where a key is unknown."""
    source = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    where = f" (in {source})" if source else ""
    for key, base in (("trainer.callbacks", Callback), ("trainer.logger", Logger)):
        if message.startswith(f'Parser key "{key}"'):
            return _explain_class(message, key, base) + where
    for marker in ("does not accept option '", "Key '", "unrecognized arguments: "):
        if marker in message:
            unknown = message.split(marker, 1)[1].split("'")[0].split()[0].lstrip("-").split(".")[-1]
            known = {action.dest.split(".")[-1] for action in parser._actions}
            hint = difflib.get_close_matches(unknown, known, n=1)
            if hint:
                return f"{message.strip()}{where}; did you mean {hint[0]!r}?"
    return f"{message.strip()}{where}"


def _explain_class(message: str, key: str, base: type) -> str:
    """A wrong class name or option in ``trainer.callbacks``/``trainer.logger``, with the fix."""
    ours = sorted({cls.__name__ for cls in _subclasses(base) if cls.__module__.startswith("shardtrain.")})
    choices = f"shardtrain's by name ({', '.join(ours)}) or your own {base.__name__} subclass by import path (my_package.My{base.__name__})"
    unknown = re.search(r"Expected a dot import path string: (\S+)", message) or re.search(
        r"Problem with given class_path '([^']+)':\s+(?:No module named|module '[^']+' has no attribute)", message
    )
    if unknown:
        name = unknown.group(1)
        hint = difflib.get_close_matches(name.split(".")[-1], ours, n=1)
        missing = re.search(r"No module named '[^']+'", message)
        return (
            f"{key}: no {base.__name__} class {name!r}"
            + (f" ({missing.group(0)})" if missing else "")
            + (f"; did you mean {hint[0]!r}? Use " if hint else "; use ")
            + choices
        )
    if "does not correspond to a subclass of" in message:
        given = re.search(r"Import path (\S+) does not|Given value: (\S+)\s*$", message.strip())
        name = next((group for group in given.groups() if group), "it") if given else "it"
        return f"{key}: {name} is not a shardtrain {base.__name__}; use {choices}"
    option = re.search(r"Problem with given class_path '([^']+)':\s+Option '([^']+)' is not accepted", message)
    if option:
        class_path, name = option.groups()
        cls = next((c for c in _subclasses(base) if c.__name__ == class_path.rsplit(".", 1)[-1]), None)
        names = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")] if cls else []
        hint = difflib.get_close_matches(name, names, n=1)
        return (
            f"{key}: {class_path} has no option {name!r}"
            + (f"; did you mean {hint[0]!r}?" if hint else "")
            + (f" Its options are: {', '.join(names)}" if names else "")
        )
    return f"{key}: {message.strip()}"


def _subclasses(base: type) -> list[type]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_subclasses(cls)]
    return found
