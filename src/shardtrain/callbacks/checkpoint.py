"""ModelCheckpoint: Lightning's checkpointing callback, on shardtrain's sharded, atomically committed checkpoints.

Lightning's arguments, defaults and meaning: when it saves (every ``every_n_train_steps`` steps, or every
``every_n_epochs`` epochs: at the end of validation, or of the training epoch when the fit has no validation), what it
keeps (the ``save_top_k`` best by ``monitor``, or the latest), the names (``filename`` templates such as
``"{epoch}-{val_loss:.2f}"``), ``save_last``, ``save_weights_only``, and its state (``best_model_path``,
``best_model_score``, ``best_k_models``, ``last_model_path``, ...), which checkpoints carry so that a resumed run
keeps ranking. A checkpoint is a directory (DCP shards and ``meta.json``), named as Lightning names its files but
without the ``.ckpt`` suffix (and ``step=<N>`` when no ``filename`` is given, not Lightning's ``epoch=<E>-step=<N>``); ``save_last`` keeps ``last.ckpt`` (a link to the checkpoint of the last save, or a
checkpoint of its own when the top-k kept none at that save). Only committed checkpoints are ever recorded, so
rotation never deletes one that ``last`` names or a save that has not finished.

shardtrain's addition: ``save_on_train_end`` (default True) also saves when training ends, so that
``ckpt_path="last"`` resumes from the end.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardtrain.callbacks.base import Callback
from shardtrain.errors import ConfigError

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer

LAST_NAME = "last.ckpt"


class ModelCheckpoint(Callback):
    """Save sharded checkpoints during ``fit`` (Lightning's ``ModelCheckpoint``).

    Args:
        dirpath: where to save; default ``<default_root_dir>/checkpoints`` (where ``ckpt_path="last"`` looks).
        filename: a template of metric names, e.g. ``"{epoch}-{step}"`` (Lightning's default) or
            ``"{epoch}-{val_loss:.2f}"``; with ``auto_insert_metric_name`` each becomes ``name=value``. The
            default is ``"{step}"`` (``step=1000``), the name of every shardtrain checkpoint.
        monitor: a logged metric (``trainer.callback_metrics``); with it, keep the ``save_top_k`` best.
            Without it, keep the ``save_top_k`` latest.
        verbose: print on rank 0 what was saved.
        save_last: also keep ``last.ckpt``, the state at every save.
        save_top_k: how many checkpoints to keep (``-1``: all; ``0``: none but ``last.ckpt``).
        save_weights_only: save the model's weights only (no optimizer, scheduler or loop state).
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        auto_insert_metric_name: write ``name=value`` for each template field.
        every_n_train_steps: save after every this many optimizer steps.
        every_n_epochs: save every this many epochs (the default, 1, when no other interval is given).
        save_on_train_epoch_end: save at the training epoch's end (True) or after validation (False); default:
            after validation when the fit validates, else at the epoch's end.
        enable_version_counter: add ``-v1``, ``-v2`` ... to a name already taken, rather than replacing.
        save_on_train_end: shardtrain's: also save when training ends (default True).
        save_trainable_only: shardtrain's: of the model, save only the parameters that train (LoRA adapters),
            with the optimizer and loop state; such a checkpoint resumes a run that reads the same pretrained
            model (``Trainer.save_checkpoint(trainable_only=True)``).
    """

    monitors_metrics = True
    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | None = None,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: Any = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        save_on_train_end: bool = True,
        save_trainable_only: bool = False,
    ) -> None:
        if train_time_interval is not None:
            raise ConfigError(
                "ModelCheckpoint(train_time_interval=...) is not supported (every rank would need to agree on the "
                "time); use every_n_train_steps"
            )
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ConfigError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        if every_n_epochs is not None and every_n_epochs < 0:
            raise ConfigError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if save_top_k < -1:
            raise ConfigError(f"save_top_k must be -1 (keep all), 0 or more, got {save_top_k}")
        if save_top_k not in (-1, 0, 1) and monitor is None and every_n_train_steps is None and every_n_epochs is None:
            pass  # Lightning allows keeping the k latest without a monitor
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.save_trainable_only = save_trainable_only
        self.mode = mode
        self.auto_insert_metric_name = auto_insert_metric_name
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1  # Lightning's default: once per epoch
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs or 0
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self.enable_version_counter = enable_version_counter
        self.save_on_train_end = save_on_train_end
        #: Lightning's state: the kept checkpoints and their scores, the best, the k-th best, the last.
        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.kth_best_model_path = ""
        self.kth_value: float = math.inf if mode == "min" else -math.inf
        self.last_model_path = ""
        self.current_score: float | None = None
        self._last_saved_step = -1
        self._kept_latest: list[str] = []  # without a monitor: the saved paths, oldest first

    # ----------------------------------------------------------------- when to save
    def setup(self, trainer: "Trainer", module: "TrainModule", stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = trainer.checkpoint_dir

    def on_train_batch_end(
        self, trainer: "Trainer", module: "TrainModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if getattr(trainer, "_accumulating", False) or step == 0:
            return  # as Lightning: not in the middle of a gradient accumulation, nor before the first step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_saved_step:
            self._save_checkpoint(trainer)

    def on_train_epoch_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if self._on_train_epoch_end(trainer) and self._epoch_due(trainer):
            self._save_checkpoint(trainer)

    def on_validation_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if getattr(trainer, "sanity_checking", False) or self._on_train_epoch_end(trainer):
            return
        if self._epoch_due(trainer) or self.every_n_train_steps:
            if not (self.every_n_train_steps and not self.every_n_epochs):
                self._save_checkpoint(trainer)

    def on_train_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if self.save_on_train_end and trainer.global_step != self._last_saved_step:
            self._save_checkpoint(trainer, at_train_end=True)

    def _on_train_epoch_end(self, trainer: "Trainer") -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        return not any(getattr(trainer, "num_val_batches", None) or [])  # no validation in this fit

    def _epoch_due(self, trainer: "Trainer") -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # ----------------------------------------------------------------- what to keep
    def _save_checkpoint(self, trainer: "Trainer", at_train_end: bool = False) -> None:
        if trainer.global_step == self._last_saved_step or getattr(trainer, "fast_dev_run", False):
            return  # as Lightning: a fast_dev_run saves no checkpoints
        metrics = self._metrics(trainer)
        score = None
        if self.monitor is not None:
            if self.monitor not in metrics:
                if at_train_end:
                    return  # nothing to rank by (e.g. training ended before validating)
                raise ConfigError(
                    f"ModelCheckpoint(monitor={self.monitor!r}) could not find {self.monitor!r} in the logged metrics "
                    f"{sorted(k for k in metrics if k not in ('epoch', 'step'))}: log it, or fix the name"
                )
            score = float(metrics[self.monitor])
            self.current_score = score
        saved: Path | None = None
        if self.save_top_k != 0 and self._keeps(score):
            saved = self._save(trainer, self._new_path(trainer, metrics))
            self._record(trainer, saved, score)
        if self.save_last:
            self._save_last(trainer, saved)
        self._last_saved_step = trainer.global_step
        trainer.engine.barrier()

    def _keeps(self, score: float | None) -> bool:
        if score is None or self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return score is None or not math.isnan(score)
        if math.isnan(score):
            return False
        return score < self.kth_value if self.mode == "min" else score > self.kth_value

    def _record(self, trainer: "Trainer", path: Path, score: float | None) -> None:
        name = str(path)
        if score is None:  # no monitor: the k latest
            self._kept_latest.append(name)
            drop = self._kept_latest[: -self.save_top_k] if self.save_top_k > 0 else []
            self._kept_latest = self._kept_latest[len(drop) :]
            self.best_model_path = name
            self.best_k_models = {}
        else:
            self.best_k_models[name] = score
            drop = []
            if self.save_top_k != -1 and len(self.best_k_models) > self.save_top_k:
                drop = [self._worst()]
                del self.best_k_models[drop[0]]
            best = (min if self.mode == "min" else max)(self.best_k_models, key=self.best_k_models.get)
            self.best_model_path, self.best_model_score = best, self.best_k_models[best]
            self.kth_best_model_path = self._worst()
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        if trainer.is_global_zero:
            for old in drop:
                if old != name and Path(old).resolve() != Path(self.last_model_path or "/nonexistent").resolve():
                    shutil.rmtree(old, ignore_errors=True)
        if self.verbose and trainer.is_global_zero:
            print(
                f"[shardtrain] ModelCheckpoint saved {name}"
                + (f" ({self.monitor}={score:.6g})" if score is not None else "")
            )

    def _worst(self) -> str:
        pick = max if self.mode == "min" else min
        return pick(self.best_k_models, key=self.best_k_models.get)

    def _save_last(self, trainer: "Trainer", saved: Path | None) -> None:
        assert self.dirpath is not None
        last = self.dirpath / LAST_NAME
        if saved is not None:  # Lightning's save_last="link": last.ckpt names the checkpoint just saved
            if trainer.is_global_zero:
                if last.is_symlink() or last.is_file():
                    last.unlink()
                elif last.is_dir():
                    shutil.rmtree(last)
                last.symlink_to(
                    saved.name if saved.parent == last.parent else saved.resolve(), target_is_directory=True
                )
            trainer.engine.barrier()
        else:
            if trainer.is_global_zero and last.is_symlink():
                last.unlink()
            trainer.engine.barrier()
            self._save(trainer, last)
        self.last_model_path = str(last)

    def _save(self, trainer: "Trainer", path: Path) -> Path:
        saved = trainer.save_checkpoint(
            path, weights_only=self.save_weights_only, trainable_only=self.save_trainable_only
        )
        if trainer.is_global_zero:  # as Lightning: each logger hears of each save (a weak proxy, as Lightning's)
            for logger in trainer.loggers:
                logger.after_save_checkpoint(weakref.proxy(self))
        return saved

    # ----------------------------------------------------------------- names
    def _metrics(self, trainer: "Trainer") -> dict[str, Any]:
        return {**trainer.callback_metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}

    def _new_path(self, trainer: "Trainer", metrics: dict[str, Any]) -> Path:
        assert self.dirpath is not None
        name = self.format_checkpoint_name(metrics)
        path = self.dirpath / name
        if self.enable_version_counter and self.save_top_k != 1:
            version = 1
            while path.exists() and str(path) not in self.best_k_models and str(path) not in self._kept_latest:
                path = self.dirpath / f"{name}{self.CHECKPOINT_JOIN_CHAR}v{version}"
                version += 1
        return path

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None) -> str:
        """The name of a checkpoint for ``metrics`` (Lightning's rules, without the ``.ckpt`` suffix)."""
        template = filename or self.filename or "{step}"  # shardtrain's default name (Lightning's: "{epoch}-{step}")
        values = dict(metrics)
        for group in sorted(re.findall(r"(\{.*?)[:\}]", template), key=len, reverse=True):
            name = group[1:]
            if self.auto_insert_metric_name:
                template = template.replace(group, name + self.CHECKPOINT_EQUALS_CHAR + "{" + name)
            template = template.replace(group, f"{{0[{name}]")
            values.setdefault(name, 0)
        return template.format(values)

    # ----------------------------------------------------------------- state in checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "current_score": self.current_score,
            "dirpath": str(self.dirpath) if self.dirpath is not None else None,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": None if math.isinf(self.kth_value) else self.kth_value,
            "last_model_path": self.last_model_path,
            "kept_latest": list(self._kept_latest),
            "last_saved_step": self._last_saved_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor", self.monitor) != self.monitor:
            return  # Lightning: another monitor's ranking does not apply
        self.best_model_score = state_dict.get("best_model_score")
        self.best_model_path = state_dict.get("best_model_path", "")
        self.current_score = state_dict.get("current_score")
        self.best_k_models = {k: v for k, v in (state_dict.get("best_k_models") or {}).items() if Path(k).exists()}
        self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
        kth = state_dict.get("kth_value")
        self.kth_value = kth if kth is not None else (math.inf if self.mode == "min" else -math.inf)
        self.last_model_path = state_dict.get("last_model_path", "")
        self._kept_latest = [p for p in state_dict.get("kept_latest", []) if Path(p).exists()]
        self._last_saved_step = state_dict.get("last_saved_step", -1)

    @property
    def best(self) -> dict[str, Any] | None:
        """The best checkpoint as ``{"path", "score"}`` (None before one is ranked)."""
        if not self.best_model_path or self.best_model_score is None:
            return None
        return {"path": self.best_model_path, "score": self.best_model_score}
