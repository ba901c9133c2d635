"""Checking the Trainer's arguments before anything starts, with errors that name the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from shardtrain.errors import ConfigError
from shardtrain.loggers import CSVLogger, Logger


def check_positive_int(name: str, value: Any, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1{' ' + hint if hint else ''}, got {value!r}")


def check_limit(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, float) and not (0.0 < value <= 1.0 or (allow_zero and value == 0.0)):
        raise ConfigError(f"{name} as a fraction must be in (0, 1], got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and value < (0 if allow_zero else 1):
        raise ConfigError(f"{name} as a number of batches must be >= {0 if allow_zero else 1}, got {value}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int (batches) or a float (fraction), got {value!r}")


def make_loggers(logger: bool | Logger | Sequence[Logger], root: Path) -> list[Logger]:
    if logger is True:
        return [CSVLogger(root)]
    if logger is False or logger is None:
        return []
    if isinstance(logger, Logger):
        return [logger]
    loggers = list(logger)
    bad = [type(item).__name__ for item in loggers if not isinstance(item, Logger)]
    if bad:
        raise ConfigError(f"logger must be True, False or Logger objects; got {bad}")
    return loggers


def limited_batches(length: int, limit: int | float | None) -> int:
    """Batches per epoch after ``limit_*_batches`` (an int count or a float fraction)."""
    if limit is None:
        return length
    if isinstance(limit, float):
        return int(length * limit)
    return min(length, limit)
