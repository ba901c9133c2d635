"""LearningRateMonitor: log each optimizer's learning rate (and momentum, weight decay) with Lightning's names:
``lr-<Optimizer>``, ``lr-<Optimizer>/pg<i>`` for several parameter groups, ``lr-<Optimizer>-<j>`` for several
optimizers of one class, or the scheduler's ``name``."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from shardtrain.callbacks.base import Callback
from shardtrain.errors import ConfigError

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer


class LearningRateMonitor(Callback):
    """``logging_interval``: ``"step"`` (on logging steps), ``"epoch"`` (each epoch's start) or None (each
    scheduler's own interval; optimizers without one: per step)."""

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False, log_weight_decay: bool = False):
        if logging_interval not in (None, "step", "epoch"):
            raise ConfigError(f"logging_interval must be None, 'step' or 'epoch', got {logging_interval!r}")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay

    def on_train_batch_start(self, trainer: "Trainer", module: "TrainModule", batch: Any, batch_idx: int) -> None:
        if self.logging_interval == "epoch":
            return
        if (trainer.batches_that_stepped + 1) % trainer.log_every_n_steps == 0:  # the cadence of the batch's row
            self._log(trainer, "step")

    def on_train_epoch_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        if self.logging_interval != "step":
            self._log(trainer, "epoch")

    def _log(self, trainer: "Trainer", interval: str) -> None:
        if not trainer.is_global_zero:
            return
        stats = self.stats(trainer, interval)
        if stats:
            for logger in trainer.loggers:
                logger.log_metrics(stats, trainer.batches_that_stepped)

    def stats(self, trainer: "Trainer", interval: str) -> dict[str, float]:
        """The figures to log now for ``interval`` (``"step"`` or ``"epoch"``)."""
        intervals = {id(config.scheduler.optimizer): config for config in trainer.lr_schedulers}
        counts = Counter(type(_raw(opt)).__name__ for opt in trainer.optimizers)
        seen: Counter[str] = Counter()
        out: dict[str, float] = {}
        for optimizer in trainer.optimizers:
            raw = _raw(optimizer)
            kind = type(raw).__name__
            config = intervals.get(id(optimizer)) or intervals.get(id(raw))
            own = config.interval if config is not None else "step"
            if self.logging_interval is None and own != interval:
                continue
            name = getattr(config, "name", None) if config is not None else None
            if not name:
                name = f"lr-{kind}" + (f"-{seen[kind]}" if counts[kind] > 1 and seen[kind] else "")
            seen[kind] += 1
            groups = optimizer.param_groups
            for index, group in enumerate(groups):
                suffix = f"/pg{index + 1}" if len(groups) > 1 else ""
                out[f"{name}{suffix}"] = float(group["lr"])
                if self.log_momentum:
                    momentum = group.get("betas", (group.get("momentum", 0.0),))[0]
                    out[f"{name}-momentum{suffix}"] = float(momentum)
                if self.log_weight_decay and "weight_decay" in group:
                    out[f"{name}-weight_decay{suffix}"] = float(group["weight_decay"])
        return out


def _raw(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)
