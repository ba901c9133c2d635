"""Strategy names: ``strategy="ddp"`` → a ``DDPStrategy``.

Built-in strategies register themselves below. Other packages add theirs through the entry-point
group ``shardtrain.strategies``; each entry point names a ``Strategy`` subclass (or any callable
that returns a strategy) and is selectable by the entry point's name::

    [project.entry-points."shardtrain.strategies"]
    my_pipeline = "my_package.strategies:PipelineStrategy"

Names are case-insensitive: every function here lower-cases the name it is given, so
``register_strategy("MyPipeline", ...)`` is selected by ``strategy="mypipeline"`` or
``strategy="MyPipeline"`` alike. A name is registered once: registering a taken name raises
unless ``override=True`` says the replacement is deliberate (as Lightning's registry does). A
plug-in never takes over a name that is already registered (the built-ins register on import,
before plug-ins are looked up); it is skipped with a warning.

``strategy="auto"`` chooses among the registrations that say so: ``auto_priority=N`` makes a name a
candidate, and ``auto`` walks the candidates from the lowest ``N`` up (ties by name), picking the
first whose ``estimate_memory`` row fits the device (``MemoryEstimate.recommend``); when none fits,
the last candidate is picked, so candidates go from fastest to leanest. The built-ins are
``single`` 100 / ``ddp`` 110 (each has a row only for its own world size), ``fsdp`` 200,
``model_parallel`` 300 (a row only where the model has a plan) and ``fsdp_cpu_offload`` 400; a
plug-in takes a place between them, e.g. ``auto_priority=50`` to be tried first. A candidate
needs a memory formula: a ``Strategy`` subclass that does not override ``estimate_memory`` is
refused at registration; a factory that is not a class is checked when ``auto`` runs (no row: not
a candidate, logged). An entry-point plug-in is a candidate when the object it names has an
integer ``auto_priority`` attribute.
"""

from __future__ import annotations

import warnings
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
    #: Where ``strategy="auto"`` tries this name (lowest first); ``None``: never chosen by ``auto``.
    auto_priority: int | None = None


_REGISTRY: dict[str, _Registration] = {}


def _key(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StrategyError(f"a strategy name must be a non-empty string, got {name!r}")
    return name.strip().lower()


def register_strategy(
    name: str,
    factory: Callable[..., Strategy],
    description: str = "",
    *,
    override: bool = False,
    auto_priority: int | None = None,
    **defaults: Any,
) -> None:
    """Make ``strategy=name`` (any case) build ``factory(**defaults)``; ``defaults`` let one class serve several aliases.

    ``auto_priority``: make the name a candidate of ``strategy="auto"``, tried in ascending order
    (built-ins: ``single`` 100, ``ddp`` 110, ``fsdp`` 200, ``model_parallel`` 300,
    ``fsdp_cpu_offload`` 400); the first candidate whose memory estimate fits is chosen.

    Raises ``StrategyError`` if ``name`` is taken, unless ``override=True`` replaces it on purpose,
    and if ``auto_priority`` is not an integer or is given for a strategy class without its own
    ``estimate_memory`` (``auto`` could never see it fit).
    """
    key = _key(name)
    if key in _REGISTRY and not override:
        taken = _REGISTRY[key]
        raise StrategyError(
            f"strategy name {key!r} is already registered ({_describe(taken)}); choose another name, "
            "or pass override=True to register_strategy() to replace it"
        )
    _check_auto_priority(key, factory, auto_priority)
    _REGISTRY[key] = _Registration(factory, defaults, description, auto_priority)


def auto_candidates() -> list[str]:
    """The names ``strategy="auto"`` may choose, in the order it tries them (``auto_priority``, then name)."""
    _load_entry_points()
    ranked = [(r.auto_priority, key) for key, r in _REGISTRY.items() if r.auto_priority is not None]
    return [key for _, key in sorted(ranked)]


def _check_auto_priority(key: str, factory: Callable[..., Strategy], auto_priority: int | None) -> None:
    if auto_priority is None:
        return
    if not isinstance(auto_priority, int) or isinstance(auto_priority, bool):
        raise StrategyError(f"auto_priority of strategy {key!r} must be an integer or None, got {auto_priority!r}")
    if isinstance(factory, type) and getattr(factory, "estimate_memory", None) is Strategy.estimate_memory:
        raise StrategyError(
            f"strategy {key!r} ({_describe_factory(factory)}) cannot be a candidate of strategy='auto': it has no "
            "memory formula; override Strategy.estimate_memory(footprint), or register it without auto_priority"
        )


def available_strategies() -> list[str]:
    """Every name ``strategy=`` accepts (lower-case), built-in and from installed packages."""
    _load_entry_points()
    return sorted(_REGISTRY)


def strategy_description(name: str) -> str:
    return _lookup(name).description


def strategy_defaults(name: str) -> dict[str, Any]:
    """The options an alias presets (e.g. ``fsdp_cpu_offload`` → ``cpu_offload=True``)."""
    return dict(_lookup(name).defaults)


def strategy_factory(name: str) -> Callable[..., Strategy]:
    """The class (or callable) that ``strategy=name`` builds."""
    return _lookup(name).factory


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
    registration = _lookup(strategy)
    try:
        return registration.factory(**{**registration.defaults, **options})
    except TypeError as error:
        if any(name.startswith("pipeline") for name in options):
            raise StrategyError(
                f"strategy {_key(strategy)!r} has no pipeline parallelism (options {sorted(options)}); use "
                "strategy='model_parallel' with pipeline_parallel_size=N: stages of your unchanged model on "
                "torch.distributed.pipelining (see docs/pipeline_parallel.md)"
            ) from error
        raise StrategyError(f"strategy {_key(strategy)!r} does not take these options: {error}") from error


def _lookup(name: str) -> _Registration:
    key = _key(name)
    _load_entry_points()
    if key not in _REGISTRY:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def _describe(registration: _Registration) -> str:
    return _describe_factory(registration.factory)


def _describe_factory(factory: Callable[..., Strategy]) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        key = entry_point.name.strip().lower()
        if key in _REGISTRY:  # a built-in (or an earlier plug-in) keeps its name
            warnings.warn(
                f"strategy plug-in {entry_point.name!r} from {entry_point.value} is ignored: the name {key!r} "
                f"is already registered ({_describe(_REGISTRY[key])}); rename the entry point",
                stacklevel=3,
            )
            continue
        try:
            factory = entry_point.load()
        except Exception as error:  # a broken plug-in must not break every run
            warnings.warn(
                f"could not load strategy {entry_point.name!r} from {entry_point.value}: {error}", stacklevel=3
            )
            continue
        auto_priority = getattr(factory, "auto_priority", None)
        try:
            _check_auto_priority(key, factory, auto_priority)
        except StrategyError as error:  # selectable by name, but not by auto
            warnings.warn(f"strategy plug-in {entry_point.name!r}: {error}", stacklevel=3)
            auto_priority = None
        _REGISTRY[key] = _Registration(factory, {}, f"from {entry_point.value}", auto_priority)
