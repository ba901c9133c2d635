"""What ``self.log`` records, and Lightning's rules for it: where logging is allowed and the defaults of ``on_step`` /
``on_epoch`` per hook (Lightning's ``_FxValidator`` table), the reductions, and the checks, made when ``log`` is
called, with errors that name the fix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from shardtrain.errors import ConfigError

#: Hooks where logging goes per step by default (on_step=True, on_epoch=False); either may be set.
_STEP_HOOKS = frozenset(
    {
        "training_step",
        "on_train_batch_start",
        "on_train_batch_end",
        "on_before_backward",
        "backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "optimizer_step",
        "configure_gradient_clipping",
        "clip_gradients",
        "on_before_zero_grad",
        "optimizer_zero_grad",
    }
)
#: Hooks where logging goes per epoch by default (on_step=False, on_epoch=True); either may be set.
_EVALUATION_HOOKS = frozenset(
    {
        f"{prefix}{stage}{suffix}"
        for stage in ("validation", "test")
        for prefix, suffix in (("", "_step"), ("on_", "_batch_start"), ("on_", "_batch_end"))
    }
)
#: Hooks where only epoch-level logging is allowed (on_step=False, on_epoch=True).
_EPOCH_ONLY_HOOKS = frozenset(
    {"on_train_start", "on_train_epoch_start", "on_train_epoch_end"}
    | {f"on_{stage}_{event}" for stage in ("validation", "test") for event in ("start", "epoch_start", "epoch_end")}
)

REDUCTIONS: dict[Any, str] = {
    "mean": "mean",
    "avg": "mean",
    torch.mean: "mean",
    "sum": "sum",
    torch.sum: "sum",
    "max": "max",
    torch.max: "max",
    "min": "min",
    torch.min: "min",
}


@dataclass(slots=True)
class LoggedValue:
    """One ``self.log`` call: the value (a 0-d tensor, or a torchmetrics ``Metric``) and Lightning's options."""

    value: Any
    prog_bar: bool = False
    logger: bool = True
    on_step: bool = True
    on_epoch: bool = False
    reduce_fx: str = "mean"
    sync_dist: bool = False
    batch_size: int | None = None
    rank_zero_only: bool = False
    dataloader_idx: int | None = None

    @property
    def is_metric(self) -> bool:
        """Whether the value is a torchmetrics ``Metric`` (computed and reset at epoch end)."""
        return callable(getattr(self.value, "compute", None)) and callable(getattr(self.value, "reset", None))


def step_and_epoch(hook: str | None, name: str, on_step: bool | None, on_epoch: bool | None) -> tuple[bool, bool]:
    """``on_step``/``on_epoch`` for a ``self.log(name, ...)`` from ``hook``: Lightning's defaults where None, and
    its refusals (a hook that may not log, ``on_step=True`` in an epoch-level hook) as errors naming the fix."""
    if hook in _STEP_HOOKS:
        default = (True, False)
    elif hook in _EVALUATION_HOOKS:
        default = (False, True)
    elif hook in _EPOCH_ONLY_HOOKS:
        if on_step:
            raise ConfigError(
                f"self.log({name!r}, on_step=True) in {hook}: {hook} runs once per epoch, so Lightning (and shardtrain) "
                "allow on_step=False only; drop on_step"
            )
        default = (False, True)
    else:
        raise ConfigError(
            f"self.log({name!r}, ...) in {hook or 'a method the Trainer did not call'}: Lightning does not allow "
            "logging there; log from the steps, the on_*_batch_* / on_*_epoch_* hooks or on_*_start"
        )
    step = default[0] if on_step is None else bool(on_step)
    epoch = default[1] if on_epoch is None else bool(on_epoch)
    if not step and not epoch:
        raise ConfigError(f"self.log({name!r}, on_step=False, on_epoch=False) logs nothing: set one of them")
    return step, epoch


def reduction(reduce_fx: str | Callable[..., Any], name: str) -> str:
    """The name of a ``reduce_fx`` (``"mean"``, ``"sum"``, ``"max"``, ``"min"``, or torch's functions for them)."""
    try:
        return REDUCTIONS[reduce_fx]
    except (KeyError, TypeError):
        raise ConfigError(
            f"self.log({name!r}, reduce_fx={reduce_fx!r}): use 'mean', 'sum', 'max' or 'min' (or torch.mean, ...)"
        ) from None


@contextlib.contextmanager
def current_hook(owner: Any, hook: str) -> Iterator[None]:
    """While it runs, ``self.log`` on ``owner`` (a TrainModule) knows it is called from ``hook`` (its defaults)."""
    previous = owner.__dict__.get("_current_hook")
    owner.__dict__["_current_hook"] = hook
    try:
        yield
    finally:
        owner.__dict__["_current_hook"] = previous
