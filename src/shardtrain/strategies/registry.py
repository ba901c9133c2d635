"""Strategy names: ``strategy="ddp"`` → a ``DDPStrategy``.

Built-in strategies register themselves below. Other packages add theirs through the entry-point
group ``shardtrain.strategies``; each entry point names a ``Strategy`` subclass (or any callable
that returns a strategy) and is selectable by the entry point's name::

    [project.entry-points."shardtrain.strategies"]
    my_pipeline = "my_package.strategies:PipelineStrategy"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

from shardtrain.errors import StrategyError
from shardtrain.strategies.base import Strategy

ENTRY_POINT_GROUP = "shardtrain.strategies"


@dataclass(frozen=True, slots=True)
class _Registration:
    factory: Callable[..., Strategy]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, _Registration] = {}


def register_strategy(name: str, factory: Callable[..., Strategy], description: str = "", **defaults: Any) -> None:
    """Make ``strategy=name`` build ``factory(**defaults)``; ``defaults`` let one class serve several aliases."""
    _REGISTRY[name] = _Registration(factory, defaults, description)


def available_strategies() -> list[str]:
    """Every name ``strategy=`` accepts, built-in and from installed packages."""
    _load_entry_points()
    return sorted(_REGISTRY)


def strategy_description(name: str) -> str:
    _load_entry_points()
    return _REGISTRY[name].description


def strategy_defaults(name: str) -> dict[str, Any]:
    """The options an alias presets (e.g. ``fsdp_cpu_offload`` → ``cpu_offload=True``)."""
    _load_entry_points()
    return dict(_REGISTRY[name.lower()].defaults)


def strategy_factory(name: str) -> Callable[..., Strategy]:
    """The class (or callable) that ``strategy=name`` builds."""
    _load_entry_points()
    return _REGISTRY[name.lower()].factory


def create_strategy(strategy: str | Strategy, **options: Any) -> Strategy:
    """Build the strategy named ``strategy`` with ``options`` overriding its alias's defaults."""
    if isinstance(strategy, Strategy):
        if options:
            raise StrategyError(
                f"options {sorted(options)} given with a strategy object; pass them to its constructor instead"
            )
        return strategy
    if not isinstance(strategy, str):
        raise StrategyError(f"strategy must be a name or a Strategy object, got {type(strategy).__name__}")
    name = strategy.lower()
    _load_entry_points()
    if name not in _REGISTRY:
        raise StrategyError(f"unknown strategy {strategy!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    registration = _REGISTRY[name]
    try:
        return registration.factory(**{**registration.defaults, **options})
    except TypeError as error:
        raise StrategyError(f"strategy {name!r} does not take these options: {error}") from error


_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _REGISTRY:
            continue  # built-in names cannot be taken over by a plug-in
        try:
            factory = entry_point.load()
        except Exception as error:  # a broken plug-in must not break every run
            import warnings

            warnings.warn(
                f"could not load strategy {entry_point.name!r} from {entry_point.value}: {error}", stacklevel=2
            )
            continue
        register_strategy(entry_point.name, factory, description=f"from {entry_point.value}")
