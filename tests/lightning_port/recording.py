"""What the oracle records, written against Lightning's API (ported with the module files that use it)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` row (rank 0) and the hyperparameters it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.hparams: dict[str, Any] = {}
        self.checkpoint_saves: list[str] = []  # after_save_checkpoint: the directory of the callback that saved

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(dict(params) if not isinstance(params, dict) else params)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.checkpoint_saves.append(str(checkpoint_callback.dirpath).rsplit("/", 1)[-1])

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append({"step": step, **{key: float(value) for key, value in metrics.items()}})


def weights(module: torch.nn.Module) -> dict[str, list[float]]:
    """The module's parameters as flat lists (to compare runs); a sharded parameter (DTensor) whole."""
    return {
        name: (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().float().flatten().tolist()
        for name, param in module.named_parameters()
    }
