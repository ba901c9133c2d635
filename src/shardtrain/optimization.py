"""What ``configure_optimizers()`` may return, turned into optimizers and scheduled LR steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from torch.optim import Optimizer

from shardtrain.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class SchedulerConfig:
    """An LR scheduler and when it steps: every ``frequency`` optimizer steps or epochs."""

    scheduler: Any
    interval: Literal["step", "epoch"] = "epoch"
    frequency: int = 1
    monitor: str | None = None


def parse_optimizers(returned: Any) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    """Accept every form Lightning documents for ``configure_optimizers``.

    A scheduler given bare steps once per epoch (Lightning's default); use the dict form
    ``{"scheduler": s, "interval": "step"}`` to step it after every optimizer step.
    """
    if isinstance(returned, Optimizer):
        return [returned], []
    if isinstance(returned, dict):
        return _from_dict(returned)
    if isinstance(returned, (list, tuple)):
        if len(returned) == 2 and isinstance(returned[0], (list, tuple)) and isinstance(returned[1], (list, tuple)):
            optimizers = list(returned[0])
            schedulers = [_scheduler(item) for item in returned[1]]
            return _check(optimizers), schedulers
        if len(returned) == 2 and isinstance(returned[0], Optimizer) and not isinstance(returned[1], Optimizer):
            return [returned[0]], [_scheduler(returned[1])]
        if all(isinstance(item, dict) for item in returned):
            optimizers, schedulers = [], []
            for item in returned:
                opts, scheds = _from_dict(item)
                optimizers += opts
                schedulers += scheds
            return optimizers, schedulers
        return _check(list(returned)), []
    raise ConfigError(
        f"configure_optimizers() returned {type(returned).__name__}; return an optimizer, (optimizer, scheduler), "
        "([optimizers], [schedulers]) or {'optimizer': ..., 'lr_scheduler': ...}"
    )


def _from_dict(returned: dict) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    if "optimizer" not in returned:
        raise ConfigError(f"configure_optimizers() returned a dict without 'optimizer' (keys: {sorted(returned)})")
    schedulers = (
        [_scheduler(returned["lr_scheduler"], returned.get("monitor"))]
        if returned.get("lr_scheduler") is not None
        else []
    )
    return _check([returned["optimizer"]]), schedulers


def _scheduler(item: Any, monitor: str | None = None) -> SchedulerConfig:
    if isinstance(item, dict):
        unknown = set(item) - {"scheduler", "interval", "frequency", "monitor", "name", "strict"}
        if "scheduler" not in item or unknown:
            raise ConfigError(
                f"an lr_scheduler dict needs 'scheduler' and may have interval/frequency/monitor; got {sorted(item)}"
            )
        if item.get("interval", "epoch") not in ("step", "epoch"):
            raise ConfigError(f"lr_scheduler interval must be 'step' or 'epoch', got {item['interval']!r}")
        return SchedulerConfig(
            scheduler=item["scheduler"],
            interval=item.get("interval", "epoch"),
            frequency=int(item.get("frequency", 1)),
            monitor=item.get("monitor", monitor),
        )
    if not hasattr(item, "step"):
        raise ConfigError(f"{type(item).__name__} is not an LR scheduler (it has no step())")
    return SchedulerConfig(scheduler=item, monitor=monitor)


def _check(optimizers: Sequence[Any]) -> list[Optimizer]:
    bad = [type(opt).__name__ for opt in optimizers if not isinstance(opt, Optimizer)]
    if bad or not optimizers:
        raise ConfigError(f"configure_optimizers() must return torch optimizers; got {bad or 'none'}")
    return list(optimizers)


def step_schedulers(
    schedulers: Sequence[SchedulerConfig],
    interval: str,
    count: int,
    metrics: dict[str, float],
    step: Callable[[Any, Any], None] | None = None,
) -> None:
    """Step the schedulers of ``interval`` whose frequency divides ``count`` (steps or epochs done).

    ``step(scheduler, metric)``: a module's ``lr_scheduler_step``, called in place of ``scheduler.step(...)``
    (``metric`` None for a scheduler that monitors nothing), as Lightning calls it."""
    for config in schedulers:
        if config.interval != interval or count % config.frequency:
            continue
        if config.monitor is not None:
            if config.monitor not in metrics:
                raise ConfigError(
                    f"LR scheduler monitors {config.monitor!r}, which was not logged; logged: {sorted(metrics)}"
                )
            metric = metrics[config.monitor]
        else:
            metric = None
        if step is not None:
            step(config.scheduler, metric)
        elif metric is not None:
            config.scheduler.step(metric)
        else:
            config.scheduler.step()
