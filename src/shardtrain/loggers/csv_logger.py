"""Metrics into ``<save_dir>/<name>/version_<N>/metrics.csv`` (Lightning's layout), hyperparameters into
``hparams.yaml`` beside it; one row per logging step, one column per metric.

Lightning starts a new ``version_<N>`` per run. A run resumed with ``ckpt_path`` continues instead: the
Trainer calls :meth:`CSVLogger.log_resume`, and a logger whose version was not given keeps writing to
the latest version that has a ``metrics.csv`` (the run's), after a marker row (``step`` and
``resumed_from_step`` set to the checkpoint's step), so that the whole loss curve of a preempted run
stays in one file. Rows that an interrupted attempt logged after its last checkpoint stay above the
marker (the resumed run logs those steps again below it). A run that starts from scratch and finds a
file in its directory (a fixed ``version``, or the default logger's ``default_root_dir/metrics.csv``)
moves it aside to ``metrics.<n>.csv``: no logged row is dropped.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping

import yaml

from shardtrain.loggers.base import (
    FileLogger,
    add_prefix,
    existing_versions,
    plain_params,
    rank_zero_experiment,
    scalar,
    yaml_safe,
)

RESUMED = "resumed_from_step"
METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"


class CSVLogger(FileLogger):
    """Log to CSV and YAML files: ``CSVLogger("logs", name="my_exp")`` writes ``logs/my_exp/version_0/metrics.csv``.

    Args:
        save_dir: where the experiment directories go; None: the Trainer's ``default_root_dir`` (a shardtrain
            default, for run configs; Lightning requires it).
        name: the experiment's directory under ``save_dir``; ``""`` or None: the versions go into ``save_dir``.
        version: None: the next free ``version_<N>``; an int ``N``: ``version_<N>``; a string: that directory
            name (``""``: ``log_dir`` is the experiment directory itself).
        prefix: put before every metric name (joined with ``-``).
        flush_logs_every_n_steps: write the buffered rows every this many logged rows (and at the end of a run).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike | None = None,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        self._save_dir = None if save_dir is None else os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._auto_version = version is None
        self._prefix = prefix
        self._flush_every = flush_logs_every_n_steps
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []  # every row of the file (rewritten when a column appears)
        self._unwritten = 0
        self._hparams: dict[str, Any] = {}
        self._started = False
        self._resuming = False

    # ------------------------------------------------------------------ where
    @property
    def log_dir(self) -> str:
        return self.version_dir

    @property
    def path(self) -> Path:
        """The metrics file."""
        return Path(self.log_dir) / METRICS_FILE

    @property
    @rank_zero_experiment
    def experiment(self) -> CSVLogger:
        """The object that writes the files: the logger itself (``log_metrics``, ``log_hyperparams``, ``save``)."""
        return self

    # ------------------------------------------------------------------ what
    def log_resume(self, step: int) -> None:
        """The run continues from a checkpoint saved at ``step``: keep writing to the run's file after a marker row.

        With no ``version`` given, the run's file is the latest ``version_<N>/metrics.csv`` (a version chosen
        for this attempt and holding only ``hparams.yaml`` is given up, its hyperparameters moved over)."""
        if self._auto_version and not self._started:
            runs = [n for n in existing_versions(self.root_dir) if (self._version_dir(n) / METRICS_FILE).is_file()]
            if runs and self._version != runs[-1]:
                self._give_up_unwritten_version()
                self._version = runs[-1]
                if self._hparams:
                    self.log_hyperparams({})
        self._resuming = True
        self.log_metrics({RESUMED: step}, step)
        self.save()

    def _version_dir(self, number: int) -> Path:
        return Path(self.root_dir) / f"version_{number}"

    def _give_up_unwritten_version(self) -> None:
        """Remove the directory of the auto version chosen for this attempt if it holds only our hparams.yaml."""
        if self._version is None:
            return
        chosen = self._version_dir(int(self._version))
        if chosen.is_dir() and {entry.name for entry in chosen.iterdir()} <= {HPARAMS_FILE}:
            (chosen / HPARAMS_FILE).unlink(missing_ok=True)
            chosen.rmdir()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._started:
            self._open()
        row = {"step": len(self._rows) if step is None else step}
        row.update(add_prefix({k: scalar(v) for k, v in metrics.items()}, self._prefix, self.LOGGER_JOIN_CHAR))
        self._rows.append(row)
        self._columns += [name for name in row if name not in self._columns]
        self._unwritten += 1
        if self._unwritten >= self._flush_every:
            self.save()

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        """Add ``params`` to ``hparams.yaml`` in ``log_dir``."""
        self._hparams.update(plain_params(params))
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        text = yaml.dump(yaml_safe(self._hparams), sort_keys=False)
        (Path(self.log_dir) / HPARAMS_FILE).write_text(text)

    def save(self) -> None:
        """Write the rows logged since the last save (the file is rewritten, atomically, when a column appeared)."""
        if not self._unwritten:
            return
        new = self._rows[-self._unwritten :]
        with_header = self._header_of_file()
        if with_header == self._columns:
            with open(self.path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._columns).writerows(new)
        else:
            self._rewrite()
        self._unwritten = 0

    def finalize(self, status: str = "success") -> None:
        self.save()

    # ------------------------------------------------------------------ files
    def _open(self) -> None:
        """At the first row: continue the file when resuming, else move an earlier run's file aside."""
        self._started = True
        if not self.path.is_file():
            return
        if self._resuming:
            with open(self.path, newline="") as handle:
                reader = csv.DictReader(handle)
                earlier = list(reader)
                self._columns += [name for name in reader.fieldnames or [] if name not in self._columns]
            self._rows = earlier + self._rows
            return
        number = 1
        while (aside := self.path.with_name(f"{self.path.stem}.{number}{self.path.suffix}")).exists():
            number += 1
        os.replace(self.path, aside)
        print(f"[shardtrain] {self.path} was there from an earlier run; moved it to {aside.name}", flush=True)

    def _header_of_file(self) -> list[str] | None:
        if not self.path.is_file():
            return None
        with open(self.path, newline="") as handle:
            return next(csv.reader(handle), None)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(temporary, self.path)  # a crash while rewriting leaves the previous file whole
