"""Metrics into TensorBoard event files under ``<save_dir>/<name>/version_<N>[/<sub_dir>]`` (Lightning's layout;
needs the optional ``tensorboard`` package)."""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping

import yaml

from shardtrain.errors import MissingDependencyError
from shardtrain.loggers.base import (
    FileLogger,
    add_prefix,
    flatten_params,
    plain_params,
    rank_zero_experiment,
    scalar,
    yaml_safe,
)
from shardtrain.utilities import rank_zero_only

HPARAMS_FILE = "hparams.yaml"


class TensorBoardLogger(FileLogger):
    """Log to TensorBoard: ``experiment`` is a ``torch.utils.tensorboard.SummaryWriter``.

    The writer opens at the first use, not here: loggers are built in every process (a run config is read
    by every rank) but only rank 0 writes, so other ranks leave no files behind.

    Args:
        save_dir: where the experiment directories go; None: the Trainer's ``default_root_dir`` (a shardtrain
            default, for run configs; Lightning requires it).
        name: the experiment's directory under ``save_dir`` (``""`` or None: the versions go into ``save_dir``).
        version: None: the next free ``version_<N>``; an int ``N``: ``version_<N>``; a string: that directory name.
        log_graph: add the model's graph (``log_graph(model, input_array)``; ``example_input_array`` by default).
        default_hp_metric: with the hyperparameters, log ``hp_metric = -1`` (TensorBoard's HPARAMS tab needs a metric).
        prefix: put before every metric name (joined with ``-``).
        sub_dir: a directory under the version's, for the event files.
        **kwargs: passed to ``SummaryWriter`` (``max_queue``, ``flush_secs``, ...).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike | None = None,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MissingDependencyError("tensorboard", "TensorBoardLogger", extra="tensorboard") from error
        self._summary_writer = SummaryWriter
        self._save_dir = None if save_dir is None else os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._log_graph = log_graph
        self._default_hp_metric = default_hp_metric
        self._prefix = prefix
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._kwargs = kwargs
        self._experiment: Any = None
        self.hparams: dict[str, Any] = {}

    @property
    def log_dir(self) -> str:
        log_dir = self.version_dir
        if self._sub_dir is not None:
            log_dir = os.path.join(log_dir, self._sub_dir)
        return os.path.expanduser(os.path.expandvars(log_dir))

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``SummaryWriter`` (opened at the first use; a stand-in that writes nothing off rank 0)."""
        if self._experiment is None:
            self._experiment = self._summary_writer(log_dir=self.log_dir, **self._kwargs)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for name, value in add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            if isinstance(value, Mapping):
                self.experiment.add_scalars(name, {k: scalar(v) for k, v in value.items()}, step)
            else:
                self.experiment.add_scalar(name, scalar(value), step)

    @rank_zero_only
    def log_hyperparams(
        self,
        params: Mapping[str, Any] | Namespace | None = None,
        metrics: Mapping[str, Any] | float | None = None,
        step: int | None = None,
    ) -> None:
        """Write ``params`` to TensorBoard's HPARAMS tab (with ``metrics``, else ``hp_metric = -1`` when
        ``default_hp_metric``) and keep them for ``hparams.yaml``."""
        from torch.utils.tensorboard.summary import hparams

        params = plain_params(params)
        self.hparams.update(params)
        flat = {key: _tensorboard_value(value) for key, value in flatten_params(params).items()}
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else None
        elif not isinstance(metrics, Mapping):
            metrics = {"hp_metric": metrics}
        if metrics:
            self.log_metrics(metrics, step)
            writer = self.experiment._get_file_writer()
            for summary in hparams(flat, dict(metrics)):
                writer.add_summary(summary, step)

    @rank_zero_only
    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Add ``model``'s graph, traced with ``input_array`` (or its ``example_input_array``), when ``log_graph``."""
        if not self._log_graph:
            return
        input_array = getattr(model, "example_input_array", None) if input_array is None else input_array
        if input_array is None:
            print("[shardtrain] TensorBoardLogger: no graph logged: set example_input_array or pass input_array")
            return
        self.experiment.add_graph(model, input_array)

    @rank_zero_only
    def save(self) -> None:
        """Flush the events and write ``hparams.yaml`` into ``log_dir`` (once it exists)."""
        if self._experiment is not None:
            self._experiment.flush()
        directory = Path(self.log_dir)
        if directory.is_dir() and not (directory / HPARAMS_FILE).is_file():
            (directory / HPARAMS_FILE).write_text(yaml.dump(yaml_safe(self.hparams), sort_keys=False))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()
            self._experiment = None
        if status == "success":
            self.save()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_experiment"] = None  # the writer holds open files: not pickled
        return state


def _tensorboard_value(value: Any) -> Any:
    """What TensorBoard's hparams accept: numbers, strings, booleans; anything else as its string."""
    value = scalar(value)
    return value if isinstance(value, (int, float, str, bool)) else str(value)
