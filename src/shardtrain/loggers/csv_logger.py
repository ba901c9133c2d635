"""Metrics into ``<root>/metrics.csv``: one row per logging step, one column per metric."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping

from shardtrain.loggers.base import Logger


class CSVLogger(Logger):
    """Appends rows; when a new metric name appears the file is rewritten with the wider header."""

    def __init__(self, root_dir: str | os.PathLike = "runs", filename: str = "metrics.csv") -> None:
        self.root_dir = Path(root_dir)
        self.path = self.root_dir / filename
        self._columns: list[str] = ["step"]
        self._rows: list[dict[str, Any]] = []
        self._started = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step, **metrics}
        self._rows.append(row)
        new_columns = [name for name in row if name not in self._columns]
        if new_columns or not self._started:
            self._columns += new_columns
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._columns).writerow(row)

    def _rewrite(self) -> None:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        self._started = True

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        self.root_dir.mkdir(parents=True, exist_ok=True)
        (self.root_dir / "hparams.json").write_text(json.dumps(dict(params), indent=2, default=str))
