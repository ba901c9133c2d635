"""The Logger interface: where metrics go. Loggers run on rank 0 only."""

from __future__ import annotations

from typing import Any, Mapping


class Logger:
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's configuration (optional)."""

    def finalize(self) -> None:
        """Flush and close; called at the end of fit and validate."""
