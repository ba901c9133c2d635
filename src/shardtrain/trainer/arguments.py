"""The Trainer's arguments, declared once: the Trainer takes them, the CLI reads them, checkpoints store them.

``TrainerArguments`` checks every value when it is made, before anything starts, with errors
that name the fix; ``shardtrain fit --config`` reads its fields (types, defaults and the help
below) through jsonargparse, and ``to_json()`` is what a checkpoint records of the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from shardtrain.callbacks.base import Callback
from shardtrain.errors import ConfigError
from shardtrain.loggers import Logger
from shardtrain.trainer.nonfinite import check_choice
from shardtrain.trainer.loop_options import check_loop_options
from shardtrain.preemption import Preemption

if TYPE_CHECKING:
    from shardtrain.strategies import Strategy


@dataclass(kw_only=True)
class TrainerArguments:
    """Everything a :class:`~shardtrain.trainer.Trainer` is configured with.

    Args:
        accelerator: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        devices: processes per node (one per GPU on CUDA); ``"auto"``: what torchrun or SLURM started,
            else every visible GPU on CUDA and one process on the CPU. Under torchrun or SLURM a
            number that differs from the launcher's layout is an error.
        num_nodes: machines in the run (under torchrun or SLURM, it must match theirs).
        strategy: a registered name (see ``available_strategies()``), ``"auto"``, or a ``Strategy`` object.
        precision: ``"32-true"``, ``"bf16-mixed"``, ``"bf16-true"`` or ``"16-mixed"`` (see docs/precision.md).
        max_steps: optimizer steps to train for (``-1``: no limit, use ``max_epochs``).
        max_epochs: passes over the training data (default 1000 when neither limit is set, as in Lightning).
        accumulate_grad_batches: micro-batches per optimizer step; gradients are synchronised
            only on the last one.
        gradient_clip_val: clip gradients to this norm (or value, see ``gradient_clip_algorithm``).
        gradient_clip_algorithm: ``"norm"`` (of the whole gradient, across shards) or ``"value"``.
        val_check_interval: ``None``: validate at the end of each epoch; an int ``n``: every ``n``
            training batches; a float ``f`` in (0, 1]: every ``f`` of an epoch.
        check_val_every_n_epoch: with end-of-epoch validation, every this many epochs.
        limit_train_batches: at most this many training batches (int) or this fraction (float) per epoch.
        limit_val_batches: at most this many validation batches (int) or this fraction (float) per run.
        limit_test_batches: at most this many batches (int) or this fraction (float) of each test loader.
        limit_predict_batches: at most this many batches (int) or this fraction (float) of each predict loader.
        inference_mode: run ``validate``/``test``/``predict`` under ``torch.inference_mode`` (else ``torch.no_grad``),
            where the strategy allows it (single, ddp on CUDA); validation inside ``fit`` always uses ``no_grad``.
        log_every_n_steps: how often training metrics are reduced over ranks and written.
        default_root_dir: where logs (``metrics.csv``) and checkpoints go.
        callbacks: extra :class:`Callback` objects.
        logger: ``True``: shardtrain's default, a ``CSVLogger`` writing ``default_root_dir/metrics.csv`` (Lightning's
            default is a ``TensorBoardLogger`` in ``default_root_dir/lightning_logs/version_<N>``: see
            docs/lightning.md); ``False``/None: no logger; or one ``Logger`` or a list of them.
        seed: seed every rank with this before building the model (same initial weights everywhere).
        enable_progress_bar: rank-0 progress bar with loss and tokens/s.
        enable_checkpointing: add a ``ModelCheckpoint()`` (Lightning's default: a checkpoint at the end of every
            epoch, the latest kept, plus one when training ends) when no ModelCheckpoint is given; False: none
            (giving one too is an error).
        enable_model_summary: before the first step, print on rank 0 the parameter count, strategy,
            layout, precision and where logs and checkpoints go (:class:`~shardtrain.callbacks.RunSummary`).
        timeout_seconds: how long a collective waits for the other ranks before the run fails.
        hang_timeout_seconds: seconds without progress on any rank after which the run writes a report naming the
            rank the others wait for, with every rank's step, phase and stack (standard error and
            ``<default_root_dir>/hang_report.txt``), and ends with exit code 124; default
            ``max(0.8 x timeout_seconds, timeout_seconds - 60)``. It must exceed the longest a step, a save or a
            validation can take.
        preemption: what to do when the cluster sends a stop signal (default: on SIGTERM or
            SIGUSR1, save a checkpoint at the next agreed step, requeue under SLURM, exit with
            code 75); a :class:`~shardtrain.preemption.Preemption`, or ``False`` to leave signals alone.
        on_nonfinite: ``"ignore"``, ``"stop"`` (raise ``NonFiniteError`` naming the step and
            ranks) or ``"skip"`` (leave the optimizer step out) when a step's loss or gradient
            norm is NaN/Inf; the checks cost one small collective and host sync per step.
        min_epochs: train at least this many epochs: a stop request (``trainer.should_stop``, early
            stopping) before then is put off until they are done, as in Lightning.
        min_steps: train at least this many optimizer steps, likewise.
        num_sanity_val_steps: validation batches run before training starts (Lightning's sanity check,
            default 2; ``-1``: the whole validation loader; ``0``: none). The validation hooks run with
            ``trainer.sanity_checking`` True, between the callbacks' ``on_sanity_check_start``/``_end``;
            nothing is logged and its metrics are not kept.
        fast_dev_run: ``True`` (1) or ``n``: a quick check of the code: ``n`` training, validation, test
            and predict batches, one epoch, ``max_steps=n``, no sanity check, no logging and no checkpoints.
        overfit_batches: train (and validate) on the same first batches every epoch: an int count or a
            float fraction of the loaders; the training loader is not shuffled.
        deterministic: ``True``: ``torch.use_deterministic_algorithms(True)`` and, on CUDA,
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8``; ``"warn"``: the same, warning instead of failing on a
            non-deterministic operation; ``False``: turn it off; ``None``: leave torch's setting alone.
        benchmark: ``torch.backends.cudnn.benchmark``; ``None``: leave it as is, except that
            ``deterministic=True`` turns it off (as in Lightning).
        reload_dataloaders_every_n_epochs: ask the DataModule or module for its training and validation
            loaders again every this many epochs (``0``: never); loaders given to ``fit`` stay.
        use_distributed_sampler: put a ``DistributedSampler`` into the loaders (default); ``False``:
            keep the loaders' samplers as they are (sharding the data is then the user's job).
        sync_batchnorm: turn every ``BatchNorm`` layer into ``SyncBatchNorm`` before the model is
            wrapped (statistics over all data-parallel ranks); ddp and fsdp only.
    """

    accelerator: str = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = 1
    strategy: str | Strategy = "auto"
    precision: str | int = "32-true"
    max_steps: int = -1
    max_epochs: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int = 1
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    inference_mode: bool = True
    log_every_n_steps: int = 50
    default_root_dir: str | os.PathLike = "runs"
    callbacks: Sequence[Callback] | Callback | None = None
    logger: bool | Logger | Sequence[Logger] | None = True
    seed: int | None = None
    enable_progress_bar: bool = True
    enable_checkpointing: bool = True
    enable_model_summary: bool = True
    timeout_seconds: float = 1800.0
    hang_timeout_seconds: float | None = None
    preemption: Preemption | bool = True
    on_nonfinite: str = "ignore"
    min_epochs: int | None = None
    min_steps: int | None = None
    num_sanity_val_steps: int = 2
    fast_dev_run: int | bool = False
    overfit_batches: int | float = 0.0
    deterministic: bool | Literal["warn"] | None = None
    benchmark: bool | None = None
    reload_dataloaders_every_n_epochs: int = 0
    use_distributed_sampler: bool = True
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        check_positive_int("accumulate_grad_batches", self.accumulate_grad_batches)
        check_positive_int("log_every_n_steps", self.log_every_n_steps)
        check_positive_int("check_val_every_n_epoch", self.check_val_every_n_epoch)
        if self.max_steps != -1:
            check_positive_int("max_steps", self.max_steps, "or -1 for no limit")
        if self.max_epochs is not None:
            check_positive_int("max_epochs", self.max_epochs)
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ConfigError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {self.gradient_clip_algorithm!r}"
            )
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ConfigError(f"gradient_clip_val must be > 0 (or None to disable), got {self.gradient_clip_val}")
        check_limit("val_check_interval", self.val_check_interval)
        check_limit("limit_train_batches", self.limit_train_batches)
        check_limit("limit_val_batches", self.limit_val_batches, allow_zero=True)
        check_limit("limit_test_batches", self.limit_test_batches, allow_zero=True)
        check_limit("limit_predict_batches", self.limit_predict_batches, allow_zero=True)
        if not isinstance(self.preemption, (bool, Preemption)):
            raise ConfigError(f"preemption must be True, False or a shardtrain.Preemption, got {self.preemption!r}")
        check_choice(self.on_nonfinite)
        check_loop_options(self)

    @property
    def epochs_limit(self) -> int | None:
        """``max_epochs``, or 1000 when neither it nor ``max_steps`` is set (as in Lightning)."""
        if self.max_epochs is not None:
            return self.max_epochs
        return 1000 if self.max_steps == -1 else None

    def to_json(self) -> dict[str, Any]:
        """The arguments as a checkpoint records them: objects (strategy, callbacks, loggers) by their repr."""
        plain = (str, int, float, bool, type(None))
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            out[item.name] = (
                value if isinstance(value, plain) else (str(value) if isinstance(value, Path) else repr(value))
            )
        return out

    def stepping_batches(self, loader: Any) -> int | float:
        """Optimizer steps the run will take over ``loader`` (inf when it has no length and no ``max_steps``)."""
        if self.max_steps > 0:
            return self.max_steps
        try:
            batches = limited_batches(len(loader), self.limit_train_batches)
        except TypeError:
            return math.inf
        return self.epochs_limit * math.ceil(batches / self.accumulate_grad_batches)

    def engine_options(self) -> dict[str, Any]:
        """What the Trainer's :class:`~shardtrain.engine.Engine` is made with."""
        names = (
            "accelerator",
            "devices",
            "num_nodes",
            "strategy",
            "precision",
            "timeout_seconds",
            "hang_timeout_seconds",
        )
        return {name: getattr(self, name) for name in names}

    def training_settings(self) -> dict[str, Any]:
        """The loop's training settings as the Engine takes them (``Engine.configure_training``, which makes
        the strategy's ``TrainingSettings`` of them; the loop adds ``micro_batch_size`` once it has a loader)."""
        names = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm")
        return {name: getattr(self, name) for name in names}

    def callback_list(self) -> list[Callback]:
        """The given callbacks, with a progress bar and a run summary unless turned off or given."""
        from shardtrain.callbacks import ModelCheckpoint, ProgressBar, RunSummary

        given = self.callbacks
        callbacks: list[Callback] = [given] if isinstance(given, Callback) else list(given or [])
        has_checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
        if has_checkpointing and not self.enable_checkpointing:
            raise ConfigError(
                "enable_checkpointing=False, but a ModelCheckpoint is among the callbacks: remove one of the two"
            )
        if self.enable_checkpointing and not has_checkpointing:
            callbacks.append(ModelCheckpoint())
        if self.enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(ProgressBar())
        if self.enable_model_summary and not any(isinstance(cb, RunSummary) for cb in callbacks):
            callbacks.insert(0, RunSummary())
        return callbacks

    @classmethod
    def names(cls) -> list[str]:
        return [item.name for item in fields(cls)]


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


def limited_batches(length: int, limit: int | float | None) -> int:
    """Batches per epoch after ``limit_*_batches`` (an int count or a float fraction)."""
    if limit is None:
        return length
    if isinstance(limit, float):
        return int(length * limit)
    return min(length, limit)
