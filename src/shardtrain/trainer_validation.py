"""The Trainer's validation loop: when it runs, and what it logs (metrics averaged over batches and ranks)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from shardtrain.errors import ConfigError
from shardtrain.metrics import MetricCollector
from shardtrain.trainer_arguments import limited_batches

if TYPE_CHECKING:
    from shardtrain.trainer import Trainer


class TrainerValidation:
    """Mixed into :class:`~shardtrain.trainer.Trainer`."""

    def _val_interval(self: "Trainer", num_batches: float) -> int:
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

    def _val_epoch_due(self: "Trainer") -> bool:
        return (self.current_epoch + 1) % self.check_val_every_n_epoch == 0 or self.val_check_interval is not None

    @torch.no_grad()
    def _validate(self: "Trainer", loader: Any) -> dict[str, float]:
        assert self.model is not None and self.module is not None
        was_training = self.model.training
        self.model.eval()
        self._call("on_validation_start")
        self._call("on_validation_epoch_start")
        collector = MetricCollector(mean_over_batches=True)
        try:
            num_batches = limited_batches(len(loader), self.limit_val_batches)
        except TypeError:
            num_batches = math.inf
        for batch_idx, batch in enumerate(loader):
            if batch_idx >= num_batches:
                break
            self._call("on_validation_batch_start", batch, batch_idx)
            outputs = self.model.validation_step(*self.module._step_arguments("validation_step", batch, batch_idx))
            collector.update(self.module.pop_logged())
            self._call("on_validation_batch_end", outputs, batch, batch_idx)
        metrics = self._log(collector, {})
        self._call("on_validation_epoch_end")
        self._call("on_validation_end")
        self.model.train(was_training)
        return metrics
