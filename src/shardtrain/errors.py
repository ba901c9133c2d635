"""Every exception shardtrain raises on purpose, in one place.

Each message names the fix. Callers catch ``ShardtrainError`` to handle any of them.
"""

from __future__ import annotations


class ShardtrainError(Exception):
    """Base class of every error raised by shardtrain itself."""


class ConfigError(ShardtrainError, ValueError):
    """An argument or configuration value is invalid; raised before any process starts."""


class StrategyError(ConfigError):
    """An unknown strategy, or options that do not belong to the chosen strategy."""


class LaunchError(ShardtrainError, RuntimeError):
    """Processes could not be started, or a rank failed and the run was stopped."""


class RankFailedError(LaunchError):
    """Another rank failed first; the message names it and holds its traceback."""

    def __init__(self, rank: int, traceback: str) -> None:
        super().__init__(f"rank {rank} failed first, which stopped this rank. Its traceback:\n{traceback.rstrip()}")
        self.rank = rank
        self.traceback = traceback


class CheckpointError(ShardtrainError, RuntimeError):
    """A checkpoint is missing, half-written, from another model, or of a newer format."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files do not match the checksums recorded when it was saved; ``problems`` names each
    damaged file and what is wrong with it."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class MissingDependencyError(ShardtrainError, ImportError):
    """An optional package is needed for the chosen feature; the message says how to install it."""

    def __init__(self, package: str, feature: str, extra: str | None = None, install: str | None = None) -> None:
        install = install or (f"pip install 'shardtrain[{extra}]'" if extra else f"pip install {package}")
        super().__init__(
            f"{feature} needs the optional package '{package}', which is not installed. Install it with: {install}"
        )
        self.package = package


class NonFiniteError(ShardtrainError, FloatingPointError):
    """A training step's loss or gradient norm was NaN or infinite (``on_nonfinite="stop"``)."""


class TrainingStepError(ShardtrainError, RuntimeError):
    """A user hook returned something the Trainer cannot use (e.g. ``training_step`` without a loss)."""
