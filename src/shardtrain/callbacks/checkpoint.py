"""ModelCheckpoint: save every N steps and/or when a validation metric improves, keeping the best k.

Lightning's arguments and meaning. Only committed checkpoints are ever recorded, so rotation
never deletes the checkpoint that ``last`` names or a save that has not finished.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardtrain.callbacks.base import Callback
from shardtrain.errors import ConfigError

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer


class ModelCheckpoint(Callback):
    """Save sharded checkpoints during ``fit``.

    Args:
        every_n_train_steps: save after every this many optimizer steps.
        monitor: a logged validation metric; with it, save after each validation run and keep
            the ``save_top_k`` best. Without it, the ``save_top_k`` most recent are kept.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        save_top_k: how many checkpoints to keep (``-1``: all).
        save_on_train_end: also save when training ends (so ``ckpt_path="last"`` resumes from the end).
    """

    monitors_metrics = True

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_on_train_end: bool = True,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ConfigError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if save_top_k < -1 or save_top_k == 0:
            raise ConfigError(f"save_top_k must be -1 (keep all) or >= 1, got {save_top_k}")
        self.every_n_train_steps = every_n_train_steps
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_on_train_end = save_on_train_end
        self.saved: list[dict[str, Any]] = []  # {"path", "step", "score"}, oldest first
        self._last_saved_step = -1

    def on_train_batch_end(
        self, trainer: "Trainer", module: "TrainModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_saved_step:
            self._save(trainer, score=None)

    def on_validation_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if trainer.sanity_checking:  # as Lightning: the sanity check's metrics are not kept
            return
        if self.monitor is None or trainer.global_step == self._last_saved_step:
            return
        if self.monitor not in trainer.callback_metrics:
            raise ConfigError(
                f"ModelCheckpoint monitors {self.monitor!r}, which was not logged; logged: {sorted(trainer.callback_metrics)}"
            )
        self._save(trainer, score=trainer.callback_metrics[self.monitor])

    def on_train_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if self.save_on_train_end and trainer.global_step != self._last_saved_step:
            self._save(trainer, score=trainer.callback_metrics.get(self.monitor) if self.monitor else None)

    @property
    def best(self) -> dict[str, Any] | None:
        scored = [entry for entry in self.saved if entry["score"] is not None]
        if not scored:
            return None
        return (min if self.mode == "min" else max)(scored, key=lambda entry: entry["score"])

    def _save(self, trainer: "Trainer", score: float | None) -> None:
        if getattr(trainer, "fast_dev_run", False):  # as Lightning: a fast_dev_run saves no checkpoints
            return
        path = trainer.save_checkpoint()
        self._last_saved_step = trainer.global_step
        self.saved = [entry for entry in self.saved if entry["path"] != str(path)]
        self.saved.append({"path": str(path), "step": trainer.global_step, "score": score})
        if trainer.is_global_zero:
            for entry in self._to_delete(path):
                shutil.rmtree(entry["path"], ignore_errors=True)
        self.saved = [entry for entry in self.saved if Path(entry["path"]).exists() or entry["path"] == str(path)]
        trainer.engine.barrier()

    def _to_delete(self, newest: Path) -> list[dict[str, Any]]:
        if self.save_top_k == -1 or len(self.saved) <= self.save_top_k:
            return []
        if self.monitor is None:
            keep = self.saved[-self.save_top_k :]
        else:
            sign = 1 if self.mode == "min" else -1
            ranked = sorted(
                self.saved,
                key=lambda e: (
                    sign * (e["score"] if e["score"] is not None and not math.isnan(e["score"]) else math.inf)
                ),
            )
            keep = ranked[: self.save_top_k]
        keep_paths = {entry["path"] for entry in keep} | {str(newest)}  # never the one 'last' names
        return [entry for entry in self.saved if entry["path"] not in keep_paths]

    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved, "last_saved_step": self._last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = list(state_dict.get("saved", []))
        self._last_saved_step = state_dict.get("last_saved_step", -1)
