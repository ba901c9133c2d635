"""The Trainer's validation loop: when it runs, and what it logs (metrics averaged over batches and ranks)."""

from __future__ import annotations

import math
from typing import Any, Callable

from shardtrain.errors import ConfigError
from shardtrain.trainer.metrics import MetricCollector
from shardtrain.module import TrainModule
from shardtrain.trainer.arguments import limited_batches
from shardtrain.trainer.loop_options import evaluation_context
from shardtrain.engine.wrapper import EngineModule


class ValidationLoop:
    """Decides when to validate and runs one validation pass.

    ``call(hook, *args)`` runs a hook on the module and the callbacks; ``log(collector, extra)``
    reduces the collected metrics over ranks, logs them and returns them.
    """

    def __init__(
        self,
        val_check_interval: int | float | None,
        check_val_every_n_epoch: int,
        limit_val_batches: int | float | None,
        call: Callable[..., None],
        log: Callable[[MetricCollector, dict[str, float]], dict[str, float]],
    ) -> None:
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.limit_val_batches = limit_val_batches
        self._call = call
        self._log = log

    def interval(self, num_batches: float) -> int:
        """Validate every this many training batches; 0 means at the end of the epoch."""
        if self.val_check_interval is None:
            return 0
        if isinstance(self.val_check_interval, float):
            if math.isinf(num_batches):
                raise ConfigError(
                    "a fractional val_check_interval needs a training loader with a length; give an int number of batches"
                )
            return max(1, int(num_batches * self.val_check_interval))
        return int(self.val_check_interval)

    def epoch_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.check_val_every_n_epoch == 0 or self.val_check_interval is not None

    #: evaluate under torch.inference_mode() (True) or torch.no_grad() (the Trainer's ``inference_mode``)
    inference_mode: bool = True

    def run(
        self, model: EngineModule, module: TrainModule, loader: Any, max_batches: float = math.inf, log: bool = True
    ) -> dict[str, float]:
        """One validation pass (at most ``max_batches``); ``log=False`` (the sanity check) logs and keeps nothing."""
        with evaluation_context(self):
            return self._run(model, module, loader, max_batches, log)

    def _run(
        self, model: EngineModule, module: TrainModule, loader: Any, max_batches: float, log: bool
    ) -> dict[str, float]:
        was_training = model.training
        model.eval()
        self._call("on_validation_start")
        self._call("on_validation_epoch_start")
        collector = MetricCollector(mean_over_batches=True)
        try:
            num_batches = limited_batches(len(loader), self.limit_val_batches)
        except TypeError:
            num_batches = math.inf
        num_batches = min(num_batches, max_batches)
        for batch_idx, batch in enumerate(loader):
            if batch_idx >= num_batches:
                break
            self._call("on_validation_batch_start", batch, batch_idx)
            outputs = model.validation_step(*module._step_arguments("validation_step", batch, batch_idx))
            collector.update(module.pop_logged())
            self._call("on_validation_batch_end", outputs, batch, batch_idx)
        metrics = self._log(collector, {}) if log else {}
        self._call("on_validation_epoch_end")
        self._call("on_validation_end")
        model.train(was_training)
        return metrics
