"""Metrics into TensorBoard event files (needs the optional ``tensorboard`` package)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from shardtrain.errors import MissingDependencyError
from shardtrain.loggers.base import Logger


class TensorBoardLogger(Logger):
    def __init__(self, root_dir: str | os.PathLike = "runs") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MissingDependencyError("tensorboard", "TensorBoardLogger", extra="tensorboard") from error
        self._writer = SummaryWriter(log_dir=str(root_dir))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self._writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in params.items()))

    def finalize(self) -> None:
        self._writer.flush()
        self._writer.close()
