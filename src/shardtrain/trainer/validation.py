"""When ``fit`` validates: every ``val_check_interval`` training batches, or at the end of every
``check_val_every_n_epoch``-th epoch. The run itself is the evaluation loop's (``trainer/evaluation.py``)."""

from __future__ import annotations

import math

from shardtrain.errors import ConfigError


class ValidationSchedule:
    """Decides when ``fit`` validates."""

    def __init__(self, val_check_interval: int | float | None, check_val_every_n_epoch: int) -> None:
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch

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
