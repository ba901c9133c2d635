"""Lightning's loop arguments with Lightning's meaning: checks, and what each changes in the fit loop.

``fast_dev_run`` and ``overfit_batches`` become batch limits (``debug_limits``), ``min_epochs``/``min_steps``
decide when a stop request may end training (``can_stop_early``), ``deterministic``/``benchmark`` set torch's
flags, ``sync_batchnorm`` converts BatchNorm layers, and
``num_sanity_val_steps`` sizes the sanity check.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardtrain.errors import ConfigError

if TYPE_CHECKING:
    from shardtrain.trainer.arguments import TrainerArguments

#: Strategies whose data-parallel ranks a ``SyncBatchNorm`` can synchronise over.
SYNC_BATCHNORM_STRATEGIES = ("single", "ddp", "fsdp")


def check_loop_options(args: TrainerArguments) -> None:
    """Refuse values Lightning refuses, with the fix in the message."""
    for name in ("min_epochs", "min_steps"):
        value = getattr(args, name)
        if value is not None and (not _is_int(value) or value < 0):
            raise ConfigError(f"{name} must be a whole number >= 0 (or None), got {value!r}")
    if not _is_int(args.num_sanity_val_steps) or args.num_sanity_val_steps < -1:
        raise ConfigError(
            f"num_sanity_val_steps must be a whole number >= 0, or -1 for the whole validation loader; "
            f"got {args.num_sanity_val_steps!r}"
        )
    if not isinstance(args.fast_dev_run, (bool, int)) or args.fast_dev_run < 0:
        raise ConfigError(f"fast_dev_run must be True, False or a number of batches >= 0, got {args.fast_dev_run!r}")
    overfit = args.overfit_batches
    if isinstance(overfit, bool) or not isinstance(overfit, (int, float)) or overfit < 0:
        raise ConfigError(f"overfit_batches must be a number of batches (int) or a fraction (float), got {overfit!r}")
    if isinstance(overfit, float) and overfit > 1.0:
        raise ConfigError(
            f"overfit_batches as a fraction must be in [0, 1]; give an int for a number of batches, got {overfit}"
        )
    if args.deterministic not in (None, True, False, "warn"):
        raise ConfigError(f"deterministic must be True, False, 'warn' or None, got {args.deterministic!r}")
    for name in ("benchmark",):
        if getattr(args, name) not in (None, True, False):
            raise ConfigError(f"{name} must be True, False or None, got {getattr(args, name)!r}")
    for name in ("inference_mode", "use_distributed_sampler", "sync_batchnorm"):  # inference_mode: the stages' argument
        if not isinstance(getattr(args, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(args, name)!r}")
    reload = args.reload_dataloaders_every_n_epochs
    if not _is_int(reload) or reload < 0:
        raise ConfigError(f"reload_dataloaders_every_n_epochs must be a whole number >= 0 (0: never), got {reload!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def debug_limits(args: TrainerArguments) -> TrainerArguments:
    """``args`` with ``fast_dev_run`` and ``overfit_batches`` turned into the limits Lightning gives them.

    ``fast_dev_run=n``: ``n`` training, validation, test and predict batches, ``max_steps=n``, one epoch, validation at the
    epoch's end, no sanity check. ``overfit_batches``: the same number (or fraction) of training and
    validation batches, every epoch.
    """
    changes: dict[str, Any] = {}
    overfit = args.overfit_batches > 0
    if args.fast_dev_run:
        batches = int(args.fast_dev_run)
        if not overfit:
            changes.update(limit_train_batches=batches, limit_val_batches=batches)
        changes.update(
            limit_test_batches=batches,
            limit_predict_batches=batches,
            max_steps=batches,
            max_epochs=1,
            num_sanity_val_steps=0,
            val_check_interval=None,
            check_val_every_n_epoch=1,
        )
    if overfit:
        changes.update(limit_train_batches=args.overfit_batches, limit_val_batches=args.overfit_batches)
    return replace(args, **changes) if changes else args


def sanity_batches(args: TrainerArguments) -> float:
    """How many validation batches the sanity check runs (inf: the whole loader)."""
    return math.inf if args.num_sanity_val_steps == -1 else args.num_sanity_val_steps


def can_stop_early(args: TrainerArguments, epochs_done: int, global_step: int) -> bool:
    """Whether a stop request (``trainer.should_stop``) may end training: ``min_epochs`` and ``min_steps`` are met."""
    return epochs_done >= (args.min_epochs or 0) and global_step >= (args.min_steps or 0)


def set_torch_flags(deterministic: bool | str | None, benchmark: bool | None) -> None:
    """torch's determinism and cuDNN benchmark flags, as Lightning sets them at ``Trainer(...)``."""
    if deterministic and benchmark is None:
        benchmark = False  # benchmarking picks algorithms by timing: not reproducible
    elif deterministic and benchmark:
        warnings.warn(
            "deterministic=True with benchmark=True: PyTorch ignores cudnn.deterministic when cudnn.benchmark is on",
            stacklevel=3,
        )
    if benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark
    if deterministic == "warn":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif isinstance(deterministic, bool):
        torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS's reproducible workspace


def convert_sync_batchnorm(
    module: nn.Module, strategy_name: str, device_type: str = "cuda", world_size: int = 1
) -> nn.Module:
    """``module`` with its BatchNorm layers made ``SyncBatchNorm`` (in place; ``Trainer(sync_batchnorm=True)``)."""
    if strategy_name not in SYNC_BATCHNORM_STRATEGIES:
        raise ConfigError(
            f"sync_batchnorm=True works with the ddp and fsdp strategies, not {strategy_name!r}: "
            "choose one of those or drop sync_batchnorm"
        )
    if device_type != "cuda" and world_size > 1:
        raise ConfigError(
            "sync_batchnorm=True needs CUDA devices: torch synchronises BatchNorm statistics only between GPUs "
            f"(this run is on {device_type}); use accelerator='cuda' or drop sync_batchnorm"
        )
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if converted is not module:
        raise ConfigError("sync_batchnorm=True needs a module that is not itself a BatchNorm layer")
    return module


def reload_due(args: TrainerArguments, epoch: int, loaded_at_epoch: int) -> bool:
    """Whether the training loader is asked for again at the start of ``epoch``."""
    every = args.reload_dataloaders_every_n_epochs
    return bool(every) and epoch - loaded_at_epoch >= every
