"""Which submodules a policy selects: a set of classes, class names (for models from other
libraries), or a callable ``(module) -> bool``. Shared by FSDP wrapping and activation checkpointing."""

from __future__ import annotations

from typing import Callable, Iterable, Union

from torch import nn

from shardtrain.errors import ConfigError

ModulePolicy = Union[set, frozenset, list, tuple, type, str, Callable[[nn.Module], bool]]


def policy_matcher(policy: ModulePolicy, what: str) -> Callable[[nn.Module], bool]:
    """A predicate from any accepted policy form."""
    if isinstance(policy, (type, str)):
        policy = {policy}
    if isinstance(policy, (set, frozenset, list, tuple)):
        classes = tuple(item for item in policy if isinstance(item, type))
        names = {item for item in policy if isinstance(item, str)}
        bad = [item for item in policy if not isinstance(item, (type, str))]
        if bad:
            raise ConfigError(f"{what} takes module classes or class names; got {bad}")
        return lambda module: (
            isinstance(module, classes) or type(module).__name__ in names or type(module).__qualname__ in names
        )
    if callable(policy):
        return policy
    raise ConfigError(
        f"{what} must be a set of module classes, class names, or a callable (module) -> bool; got {type(policy).__name__}"
    )


def select_modules(root: nn.Module, policy: ModulePolicy, what: str) -> list[nn.Module]:
    """The submodules of ``root`` (not ``root`` itself) that ``policy`` selects, in module order.

    Raises when nothing matches: a policy that selects nothing is always a mistake (a typo in
    a class name, a model from another library) and would silently cost memory or speed.
    """
    matches = policy_matcher(policy, what)
    selected = [module for module in root.modules() if module is not root and matches(module)]
    if not selected:
        classes = sorted({type(m).__name__ for m in root.modules()})
        raise ConfigError(
            f"{what} {policy!r} matches no module of {type(root).__name__}; its module classes are: {', '.join(classes)}"
        )
    return selected


def repeated_blocks(root: nn.Module) -> list[nn.Module]:
    """The children of the largest ``nn.ModuleList`` (by parameter count): the transformer blocks of most models."""
    lists = [module for module in root.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        return []
    largest = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    return list(largest)


def units_of(root: nn.Module, policy: ModulePolicy | None) -> list[nn.Module]:
    """The modules ``policy`` selects as units (FSDP's ``auto_wrap_policy``), by default ``repeated_blocks``."""
    return select_modules(root, policy, "auto_wrap_policy") if policy is not None else repeated_blocks(root)


def describe(modules: Iterable[nn.Module]) -> str:
    counts: dict[str, int] = {}
    for module in modules:
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return ", ".join(f"{count} x {name}" for name, count in counts.items())
