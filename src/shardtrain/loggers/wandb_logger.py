"""Metrics and hyperparameters into a Weights & Biases run (needs the optional ``wandb`` package:
``pip install 'shardtrain[wandb]'``); Lightning's ``WandbLogger`` arguments and properties."""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any, Mapping

from shardtrain.errors import ConfigError, MissingDependencyError
from shardtrain.loggers.base import Logger, add_prefix, plain_params, rank_zero_experiment, scalar, yaml_safe
from shardtrain.utilities import rank_zero_only

STEP_KEY = "trainer/global_step"


class WandbLogger(Logger):
    """Log to W&B: ``experiment`` is the ``wandb`` run (started at the first use, on rank 0 only).

    Args:
        name: the run's display name.
        save_dir: where W&B keeps its local files (``<save_dir>/wandb/``); ``dir`` is the same.
        version: the run's id (to resume a run); ``id`` is the same.
        offline: write the run locally only (``wandb sync`` uploads it later).
        anonymous: log anonymously.
        project: the W&B project (default: ``$WANDB_PROJECT``, else ``"lightning_logs"``).
        log_model: refused when set: uploading checkpoints as artifacts is not built (shardtrain's checkpoints
            are sharded directories; upload one yourself with ``experiment.log_artifact``).
        experiment: an existing run to log into.
        prefix: put before every metric name (joined with ``-``).
        checkpoint_name: accepted for Lightning's signature; unused without ``log_model``.
        add_file_policy: accepted for Lightning's signature; unused without ``log_model``.
        **kwargs: passed to ``wandb.init`` (``entity``, ``group``, ``tags``, ``mode``, ...).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | os.PathLike = ".",
        version: str | None = None,
        offline: bool = False,
        dir: str | os.PathLike | None = None,
        id: str | None = None,
        anonymous: bool | None = None,
        project: str | None = None,
        log_model: bool | str = False,
        experiment: Any = None,
        prefix: str = "",
        checkpoint_name: str | None = None,
        add_file_policy: str = "mutable",
        **kwargs: Any,
    ) -> None:
        _import_wandb()
        if log_model:
            raise ConfigError(
                f"WandbLogger(log_model={log_model!r}) is not supported: shardtrain does not upload checkpoints as W&B"
                " artifacts; leave log_model=False and log one yourself with logger.experiment.log_artifact(...)"
            )
        self._prefix = prefix
        self._experiment = experiment
        directory = save_dir if save_dir is not None else dir
        self._wandb_init: dict[str, Any] = {
            "name": name,
            "project": project or os.environ.get("WANDB_PROJECT", "lightning_logs"),
            "dir": None if directory is None else os.fspath(directory),
            "id": version or id,
            "resume": "allow",
        }
        if anonymous:
            self._wandb_init["anonymous"] = "allow"
        if offline:
            self._wandb_init["mode"] = "offline"
        self._wandb_init.update(kwargs)
        self.checkpoint_name = checkpoint_name
        self.add_file_policy = add_file_policy

    @property
    def name(self) -> str | None:
        """The project (as Lightning: the run's own name is ``experiment.name``)."""
        return self._wandb_init["project"]

    @property
    def version(self) -> str | None:
        """The run's id (the given one until the run starts)."""
        return self._experiment.id if self._experiment is not None else self._wandb_init["id"]

    @property
    def save_dir(self) -> str | None:
        return self._wandb_init["dir"]

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``wandb`` run: the one in progress in this process if any, else a new one (``wandb.init``)."""
        if self._experiment is None:
            wandb = _import_wandb()
            if self.save_dir is not None:
                os.makedirs(self.save_dir, exist_ok=True)
            self._experiment = wandb.run if wandb.run is not None else wandb.init(**self._wandb_init)
            if callable(getattr(self._experiment, "define_metric", None)):
                self._experiment.define_metric(STEP_KEY)
                self._experiment.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        return self._experiment

    def watch(self, model: Any, log: str | None = "gradients", log_freq: int = 100, log_graph: bool = True) -> None:
        """W&B's gradient and parameter tracking of ``model``."""
        self.experiment.watch(model, log=log, log_freq=log_freq, log_graph=log_graph)

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        """Add ``params`` to the run's config (objects by their string)."""
        self.experiment.config.update(yaml_safe(plain_params(params)), allow_val_change=True)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = {key: scalar(value) for key, value in add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items()}
        if step is not None and not self._wandb_init.get("sync_tensorboard"):
            row[STEP_KEY] = step
        self.experiment.log(row)


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise MissingDependencyError("wandb", "WandbLogger", extra="wandb") from error
    return wandb
