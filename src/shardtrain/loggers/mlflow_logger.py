"""Metrics and hyperparameters into an MLflow run (needs the optional ``mlflow`` package:
``pip install 'shardtrain[mlflow]'``); Lightning's ``MLFlowLogger`` arguments and properties."""

from __future__ import annotations

import os
import re
import time
from argparse import Namespace
from typing import Any, Mapping

from shardtrain.errors import ConfigError, MissingDependencyError
from shardtrain.loggers.base import Logger, add_prefix, flatten_params, plain_params, rank_zero_experiment, scalar
from shardtrain.utilities import rank_zero_only

LOCAL_FILE_URI_PREFIX = "file:"
_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}


class MLFlowLogger(Logger):
    """Log to MLflow: ``experiment`` is an ``MlflowClient``; the experiment and the run are made at the first use.

    Args:
        experiment_name: the MLflow experiment (made when missing).
        run_name: the run's name (the ``mlflow.runName`` tag).
        tracking_uri: the tracking server or store (default ``$MLFLOW_TRACKING_URI``, else ``file:<save_dir>``).
        tags: the run's tags.
        save_dir: the local store when no ``tracking_uri`` is given.
        log_model: refused when set: uploading checkpoints as artifacts is not built (log one yourself with
            ``experiment.log_artifact(run_id, path)``).
        prefix: put before every metric name (joined with ``-``).
        artifact_location: where a new experiment keeps its artifacts.
        run_id: log into this existing run (to resume it).
        synchronous: MLflow's ``synchronous`` for ``log_batch`` (None: MLflow's default).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str | None = "./mlruns",
        log_model: bool | str = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        _import_mlflow()
        if log_model:
            raise ConfigError(
                f"MLFlowLogger(log_model={log_model!r}) is not supported: shardtrain does not upload checkpoints as"
                " MLflow artifacts; leave log_model=False and log one yourself with"
                " logger.experiment.log_artifact(logger.run_id, path)"
            )
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"{LOCAL_FILE_URI_PREFIX}{save_dir}"
        self._experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._tracking_uri = tracking_uri
        self._run_name = run_name
        self._run_id = run_id
        self.tags = tags
        self._prefix = prefix
        self._artifact_location = artifact_location
        self._log_batch_kwargs = {} if synchronous is None else {"synchronous": synchronous}
        self._client: Any = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``MlflowClient``, with the experiment and the run made (or found) on first use."""
        if self._client is not None:
            return self._client
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        client = MlflowClient(self._tracking_uri)
        if self._run_id is not None:
            self._experiment_id = client.get_run(self._run_id).info.experiment_id
        else:
            if self._experiment_id is None:
                found = client.get_experiment_by_name(self._experiment_name)
                if found is not None and found.lifecycle_stage != "deleted":
                    self._experiment_id = found.experiment_id
                else:
                    self._experiment_id = client.create_experiment(
                        name=self._experiment_name, artifact_location=self._artifact_location
                    )
            tags = dict(self.tags or {})
            if self._run_name is not None:
                tags[MLFLOW_RUN_NAME] = self._run_name
            self._run_id = client.create_run(experiment_id=self._experiment_id, tags=tags).info.run_id
        self._client = client
        return client

    @property
    def run_id(self) -> str | None:
        """The run's id (the run is made on first use)."""
        _ = self.experiment
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        _ = self.experiment
        return self._experiment_id

    @property
    def name(self) -> str | None:
        """The experiment's id (as Lightning)."""
        return self.experiment_id

    @property
    def version(self) -> str | None:
        """The run's id (as Lightning)."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The local store's directory when the tracking URI is a ``file:`` one, else None."""
        if self._tracking_uri.startswith(LOCAL_FILE_URI_PREFIX):
            return self._tracking_uri[len(LOCAL_FILE_URI_PREFIX) :]
        return None

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        """``params`` as the run's parameters (nested keys joined with ``/``; values as strings, at most 250 characters)."""
        from mlflow.entities import Param

        flat = flatten_params(plain_params(params))
        listed = [Param(key=key, value=str(value)[:250]) for key, value in flat.items()]
        for start in range(0, len(listed), 100):  # MLflow takes at most 100 parameters a batch
            self.experiment.log_batch(run_id=self.run_id, params=listed[start : start + 100], **self._log_batch_kwargs)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        listed = []
        for key, value in add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR).items():
            value = scalar(value)
            if isinstance(value, str):
                continue  # MLflow metrics are numbers
            key = re.sub(r"[^a-zA-Z0-9_/. -]+", "", key)  # the characters MLflow allows in a metric name
            listed.append(Metric(key=key, value=float(value), timestamp=now, step=step or 0))
        self.experiment.log_batch(run_id=self.run_id, metrics=listed, **self._log_batch_kwargs)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Mark the run ``FINISHED`` (``"success"``) or ``FAILED``."""
        if self._client is None:
            return
        self._client.set_terminated(self._run_id, _STATUS.get(status, status))


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError as error:
        raise MissingDependencyError("mlflow", "MLFlowLogger", extra="mlflow") from error
    return mlflow
