"""Metrics into ``<root>/metrics.csv``: one row per logging step, one column per metric.

One run, one file, also across restarts. Checkpoints and ``ckpt_path="last"`` live under the
same ``default_root_dir``, and a preempted job restarts with the same command line, so a
resumed run appends to the file it finds, after a marker row (``step`` and
``resumed_from_step`` set to the checkpoint's step): the whole loss curve stays in one file.
Rows that an interrupted attempt logged after its last checkpoint stay above the marker (the
resumed run logs those steps again below it). A run that starts from scratch and finds a file
moves it aside to ``metrics.<n>.csv``. No logged row is dropped: Lightning's ``version_N``
directories would split one preempted run over several files instead.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping

from shardtrain.loggers.base import Logger

RESUMED = "resumed_from_step"


class CSVLogger(Logger):
    """Appends rows; when a new metric name appears the file is rewritten (atomically) with the wider header."""

    def __init__(self, root_dir: str | os.PathLike = "runs", filename: str = "metrics.csv") -> None:
        self.root_dir = Path(root_dir)
        self.path = self.root_dir / filename
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []
        self._started = False
        self._resuming = False

    def log_resume(self, step: int) -> None:
        """The run continues from a checkpoint saved at ``step``: keep the rows logged so far and mark the place."""
        self._resuming = True
        self.log_metrics({RESUMED: step}, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._started:
            self._open()
        row = {"step": step, **metrics}
        self._rows.append(row)
        new_columns = [name for name in row if name not in self._columns]
        if new_columns or not self.path.exists():
            self._columns += new_columns
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._columns).writerow(row)

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

    def _rewrite(self) -> None:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(temporary, self.path)  # a crash while rewriting leaves the previous file whole

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        (self.root_dir / "hparams.json").write_text(json.dumps(dict(params), indent=2, default=str))
