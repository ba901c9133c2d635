"""The Trainer's loggers: what its ``logger`` argument means, and Lightning's ``trainer.log_dir`` rule."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

from shardtrain.errors import ConfigError
from shardtrain.loggers import CSVLogger, Logger, TensorBoardLogger


def make_loggers(logger: bool | Logger | Sequence[Logger] | None, root: Path) -> list[Logger]:
    """``True``: the default logger; ``False``/None: none; one ``Logger`` or a list of them as given.

    The default writes ``root/metrics.csv`` (``CSVLogger(root, name="", version="")``, every row at once):
    shardtrain's path since its first release, where a resumed run keeps one file (see CSVLogger)."""
    if logger is True:
        return [default_logger(root)]
    if logger is False or logger is None:
        return []
    if isinstance(logger, Logger):
        logger = [logger]
    if isinstance(logger, (str, bytes)) or not isinstance(logger, Sequence):
        raise ConfigError(f"logger must be True, False, a Logger or a list of Loggers; got {type(logger).__name__}")
    loggers = list(logger)
    bad = [type(item).__name__ for item in loggers if not isinstance(item, Logger)]
    if bad:
        raise ConfigError(
            f"logger must be True, False or Logger objects (shardtrain.loggers, or your own Logger subclass); got {bad}"
        )
    for item in loggers:
        if callable(getattr(item, "use_default_dir", None)):
            item.use_default_dir(root)
    return loggers


def default_logger(root: Path) -> CSVLogger:
    """What ``logger=True`` makes: ``root/metrics.csv``, each row written when logged."""
    return CSVLogger(root, name="", version="", flush_logs_every_n_steps=1)


def log_dir(loggers: list[Logger], default_root_dir: Path, broadcast: Any) -> str:
    """Lightning's ``trainer.log_dir``: the first logger's ``log_dir`` (CSV, TensorBoard) or ``save_dir`` (others),
    else ``default_root_dir``; rank 0's answer on every rank (``broadcast``), as a version is chosen there."""
    if not loggers:
        directory: Any = str(default_root_dir)
    elif isinstance(loggers[0], (CSVLogger, TensorBoardLogger)):
        directory = loggers[0].log_dir
    else:
        directory = loggers[0].save_dir
    return broadcast(directory)


def start_experiments(loggers: list[Logger]) -> None:
    """Open each logger's ``experiment`` before the ``setup`` hooks, as Lightning does, so that its name, version
    and run exist in the hooks (a W&B run's id, an MLflow run); off rank 0 ``rank_zero_experiment`` makes it a no-op."""
    for logger in loggers:
        if hasattr(type(logger), "experiment"):
            _ = logger.experiment


def finalize(loggers: list[Logger], status: str) -> None:
    """Each logger's ``finalize(status)`` (``"success"`` or ``"failed"``); a logger written against shardtrain before
    Lightning's signature (``finalize(self)``) is called without it."""
    for logger in loggers:
        try:
            takes_status = bool(inspect.signature(logger.finalize).parameters)
        except (TypeError, ValueError):
            takes_status = True
        logger.finalize(status) if takes_status else logger.finalize()


def log_hyperparams(loggers: list[Logger], hparams: Any, module: Any) -> None:
    """Lightning's order at the start of a stage: each logger's ``log_hyperparams(hparams)`` (when there are any),
    ``log_graph(module)`` (TensorBoard with ``log_graph=True``; a no-op elsewhere), then ``save()``."""
    for logger in loggers:
        if hparams is not None:
            logger.log_hyperparams(hparams)
        logger.log_graph(module)
        logger.save()
