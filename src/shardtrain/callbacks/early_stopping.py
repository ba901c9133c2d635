"""EarlyStopping: stop training when a monitored metric stops improving (Lightning's callback, its arguments and
checks). Every rank takes the same decision: it is reduced over ranks (any rank stopping stops all), as in
Lightning, since a metric logged without ``sync_dist`` differs between ranks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from shardtrain.callbacks.base import Callback
from shardtrain.errors import ConfigError

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer


class EarlyStopping(Callback):
    """Set ``trainer.should_stop`` when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    checks (each validation, or each training epoch's end with ``check_on_train_epoch_end``), when it reaches
    ``stopping_threshold``, passes ``divergence_threshold``, or (``check_finite``) is NaN or infinite.
    ``strict``: a monitored metric that was not logged is an error (else a warning and no check)."""

    monitors_metrics = True

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.min_delta = abs(min_delta) * (1 if mode == "max" else -1)  # Lightning's sign convention
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self._check_on_train_epoch_end = check_on_train_epoch_end
        self.log_rank_zero_only = log_rank_zero_only
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopping_reason_message: str | None = None

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}}}"

    def on_train_epoch_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if self._on_train_epoch_end(trainer):
            self._check(trainer)

    def on_validation_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if not self._on_train_epoch_end(trainer) and not getattr(trainer, "sanity_checking", False):
            self._check(trainer)

    def _on_train_epoch_end(self, trainer: "Trainer") -> bool:
        if self._check_on_train_epoch_end is not None:
            return self._check_on_train_epoch_end
        return not any(
            getattr(trainer, "num_val_batches", None) or []
        )  # Lightning: after validation when the fit validates

    def _check(self, trainer: "Trainer") -> None:
        if trainer.stage != "fit":
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            if self.strict:
                raise ConfigError(
                    f"EarlyStopping(monitor={self.monitor!r}) could not find it in the logged metrics "
                    f"{sorted(metrics)}: log it, fix the name, or pass strict=False"
                )
            return
        current = float(metrics[self.monitor])
        should_stop, reason = self._evaluate(current)
        decision = torch.tensor(float(should_stop), device=trainer.engine.device)
        should_stop = bool(trainer.engine.all_reduce(decision, "max").item())  # once per check: every rank agrees
        if should_stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if reason and self.verbose and trainer.is_global_zero:
            print(f"[shardtrain] EarlyStopping: {reason}", flush=True)

    def _evaluate(self, current: float) -> tuple[bool, str | None]:
        better = (lambda a, b: a < b) if self.mode == "min" else (lambda a, b: a > b)
        if self.check_finite and not math.isfinite(current):
            return True, f"{self.monitor} = {current} is not finite; best was {self.best_score:.6g}"
        if self.stopping_threshold is not None and better(current, self.stopping_threshold):
            return True, f"{self.monitor} = {current:.6g} reached the stopping threshold {self.stopping_threshold}"
        if self.divergence_threshold is not None and better(-current, -self.divergence_threshold):
            return True, f"{self.monitor} = {current:.6g} passed the divergence threshold {self.divergence_threshold}"
        if better(current - self.min_delta, self.best_score):
            self.best_score = current
            self.wait_count = 0
            return False, f"{self.monitor} improved to {current:.6g}"
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (
                f"{self.monitor} did not improve in the last {self.wait_count} checks; best {self.best_score:.6g}"
            )
        return False, None

    def state_dict(self) -> dict[str, Any]:
        best = None if math.isinf(self.best_score) else self.best_score
        return {
            "wait_count": self.wait_count,
            "stopped_epoch": self.stopped_epoch,
            "best_score": best,
            "patience": self.patience,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict.get("wait_count", 0)
        self.stopped_epoch = state_dict.get("stopped_epoch", 0)
        best = state_dict.get("best_score")
        self.best_score = best if best is not None else (math.inf if self.mode == "min" else -math.inf)
        self.patience = state_dict.get("patience", self.patience)
