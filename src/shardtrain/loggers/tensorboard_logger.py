"""Metrics into TensorBoard event files (needs the optional ``tensorboard`` package)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from shardtrain.errors import MissingDependencyError
from shardtrain.loggers.base import Logger


class TensorBoardLogger(Logger):
    """Writes event files into ``root_dir``.

    The writer opens at the first write, not here: loggers are built in every process (a run
    config is read by every rank) but only rank 0 writes, so other ranks leave no files behind.
    """

    def __init__(self, root_dir: str | os.PathLike = "runs") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MissingDependencyError("tensorboard", "TensorBoardLogger", extra="tensorboard") from error
        self._make_writer = lambda: SummaryWriter(log_dir=str(root_dir))
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self._make_writer()
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in params.items()))

    def finalize(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
