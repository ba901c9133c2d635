"""The Logger interface, in Lightning's shape: where metrics and hyperparameters go.

The Trainer calls the loggers on rank 0 only (metrics are already reduced over ranks there);
``rank_zero_experiment`` gives other ranks a stand-in ``experiment`` so that user code such as
``self.logger.experiment.add_image(...)`` runs everywhere and writes nothing off rank 0.
A user's own Lightning-style subclass (``name``, ``version``, ``log_metrics``, ``log_hyperparams``,
decorated with ``rank_zero_only``) works as written.
"""

from __future__ import annotations

import functools
import os
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Mapping

from shardtrain.errors import ConfigError
from shardtrain.utilities import rank_zero_only


class Logger:
    """Base class of every logger: subclasses write ``log_metrics`` and ``log_hyperparams``, and name the run
    with ``name``/``version``; the rest defaults to Lightning's (no directories, nothing to save)."""

    @property
    def name(self) -> str | None:
        """The experiment's name (a sub-directory of ``save_dir`` for the file loggers)."""
        return None

    @property
    def version(self) -> int | str | None:
        """The experiment's version (``version_<N>`` directories for the file loggers)."""
        return None

    @property
    def root_dir(self) -> str | None:
        """The directory holding every version of this experiment, or None."""
        return None

    @property
    def log_dir(self) -> str | None:
        """This run's directory, or None."""
        return None

    @property
    def save_dir(self) -> str | None:
        """The directory this logger was given to write under, or None."""
        return None

    @property
    def group_separator(self) -> str:
        """What joins a group and a metric name (``train/loss``)."""
        return "/"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Write one row of metrics at ``step`` (called on rank 0 every logging step)."""
        raise NotImplementedError(f"{type(self).__name__} must define log_metrics(metrics, step)")

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Record the run's hyperparameters (the module's ``hparams``, called at fit start). Nothing by default
        (abstract in Lightning; a no-op here so that a logger written before this method existed keeps working)."""

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Record the model's graph where the logger can (TensorBoard with ``log_graph=True``); else nothing."""

    def save(self) -> None:
        """Write what is buffered."""

    def finalize(self, status: str = "success") -> None:
        """The run ended (``"success"``, or ``"failed"`` after an exception): save and close."""
        self.save()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """A checkpoint was saved (Lightning's ``ModelCheckpoint`` calls this); nothing by default."""


class FileLogger(Logger):
    """A logger writing under ``<save_dir>/<name>/<version>`` (Lightning's layout, the CSV and TensorBoard loggers):
    subclasses set ``_save_dir`` (None: the Trainer's ``default_root_dir``), ``_name`` and ``_version``."""

    _save_dir: str | None
    _name: str
    _version: int | str | None

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str:
        """The given version, else the next free number under ``root_dir`` (fixed at the first read)."""
        if self._version is None:
            self._version = next_version(self.root_dir)
        return self._version

    @property
    def save_dir(self) -> str:
        if self._save_dir is None:
            raise ConfigError(
                f"{type(self).__name__} has no save_dir yet: give {type(self).__name__}(save_dir=...) or pass it to a"
                " Trainer (which gives it its default_root_dir)"
            )
        return self._save_dir

    def use_default_dir(self, directory: str | os.PathLike) -> None:
        """Write under ``directory`` when no ``save_dir`` was given (the Trainer passes its ``default_root_dir``)."""
        if self._save_dir is None:
            self._save_dir = os.fspath(directory)

    @property
    def root_dir(self) -> str:
        return os.path.join(self.save_dir, self.name) if self.name else self.save_dir

    @property
    def version_dir(self) -> str:
        """``root_dir/version_<N>`` (or the version's own name; ``root_dir`` itself for an empty one)."""
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return os.path.join(self.root_dir, version) if version else self.root_dir


class DummyExperiment:
    """What ``experiment`` is off rank 0: every attribute, call and index does nothing."""

    def nop(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, _: str) -> Callable[..., None]:
        return self.nop

    def __getitem__(self, _: Any) -> DummyExperiment:
        return self

    def __setitem__(self, *_: Any) -> None:
        pass


def rank_zero_experiment(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate an ``experiment`` property's getter: the real object on rank 0, a ``DummyExperiment`` elsewhere
    (so that no other rank creates files)."""

    @functools.wraps(fn)
    def experiment(self: Any) -> Any:
        if rank_zero_only.rank != 0:  # type: ignore[attr-defined]
            return DummyExperiment()
        return fn(self)

    return experiment


def next_version(root: str | os.PathLike) -> int:
    """One more than the highest ``version_<N>`` directory under ``root`` (0 when there is none)."""
    return max(existing_versions(root), default=-1) + 1


def existing_versions(root: str | os.PathLike) -> list[int]:
    """The numbers ``N`` of the ``version_<N>`` directories under ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        number = entry.name.removeprefix("version_")
        if entry.is_dir() and entry.name.startswith("version_") and number.isdigit():
            found.append(int(number))
    return sorted(found)


def plain_params(params: Mapping[str, Any] | Namespace | None) -> dict[str, Any]:
    """Hyperparameters as a plain dict (an argparse ``Namespace`` or any mapping; None: empty)."""
    if params is None:
        return {}
    if isinstance(params, Namespace):
        return dict(vars(params))
    return dict(params)


def flatten_params(params: Mapping[str, Any], separator: str = "/") -> dict[str, Any]:
    """Nested dicts flattened into ``outer/inner`` keys (what TensorBoard, W&B and MLflow take)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping) and value:
            for inner, inner_value in flatten_params(value, separator).items():
                flat[f"{key}{separator}{inner}"] = inner_value
        else:
            flat[str(key)] = value
    return flat


def add_prefix(metrics: Mapping[str, Any], prefix: str, separator: str) -> dict[str, Any]:
    """Lightning's ``prefix``: every key becomes ``<prefix><separator><key>``."""
    if not prefix:
        return dict(metrics)
    return {f"{prefix}{separator}{key}": value for key, value in metrics.items()}


def scalar(value: Any) -> Any:
    """A tensor's Python number (loggers get floats from the Trainer; a user's direct call may pass tensors)."""
    return value.item() if hasattr(value, "item") and callable(value.item) else value


def yaml_safe(value: Any) -> Any:
    """``value`` as YAML writes it plainly: mappings and lists kept, tensors as numbers, other objects as strings."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [yaml_safe(v) for v in value]
    value = scalar(value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
