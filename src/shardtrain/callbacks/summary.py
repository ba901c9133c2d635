"""RunSummary: a few lines on rank 0, before the first step, saying what is about to run.

The model's size, the strategy and its layout over the processes, the precision, how long the
run is, and where logs and checkpoints go; Lightning's ``ModelSummary`` in spirit, shorter.

Parameters are counted over the whole model whatever the sharding, with no collective: FSDP2's
parameters are DTensors whose ``numel()`` is the global count, and DeepSpeed ZeRO-3 keeps the full
count in ``ds_numel`` (its local tensor is an empty placeholder). Tied parameters count once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shardtrain.callbacks.base import Callback

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer

PREFIX = "[shardtrain]"


class RunSummary(Callback):
    """Print the run's summary at the start of ``fit`` (added by ``Trainer(enable_model_summary=True)``)."""

    def on_fit_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        if trainer.is_global_zero:
            print("\n".join(f"{PREFIX} {line}" for line in summary_lines(trainer, module)), flush=True)


def global_numel(parameter: torch.Tensor) -> int:
    """Elements of the whole parameter, not of this rank's shard."""
    partitioned = getattr(parameter, "ds_numel", None)  # DeepSpeed ZeRO-3
    return int(partitioned) if partitioned is not None else parameter.numel()  # a DTensor's numel is global


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters of ``module`` over every shard."""
    total = trainable = 0
    for parameter in module.parameters():  # each shared parameter once
        count = global_numel(parameter)
        total += count
        trainable += count if parameter.requires_grad else 0
    return total, trainable


def summary_lines(trainer: "Trainer", module: "TrainModule") -> list[str]:
    total, trainable = count_parameters(module)
    size = f"{_short(total)} parameters" + ("" if trainable == total else f" ({_short(trainable)} trainable)")
    stages = trainer.engine.parallel_dims.pp
    if stages > 1:  # counted with no collective: rank 0 holds only its own stage
        size += " on rank 0, which holds only its own pipeline stages"
    env = trainer.engine.environment
    nodes = max(1, env.world_size // max(1, env.local_world_size))
    layout = f"{trainer.world_size} process{'es' if trainer.world_size != 1 else ''}" + (
        f" on {nodes} nodes" if nodes > 1 else ""
    )
    lines = [
        f"{type(module).__name__}: {size}",
        f"{trainer.strategy!r} over {layout} ({trainer.engine.device.type}), precision {trainer.engine.precision.name}",
        _length(trainer),
        f"logs: {_logs(trainer)}; checkpoints: {_checkpoints(trainer)}",
    ]
    return lines


def _short(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _length(trainer: "Trainer") -> str:
    steps = trainer.estimated_stepping_batches
    text = f"{steps:,} optimizer steps" if isinstance(steps, int) else f"{trainer.max_epochs} epochs"
    if trainer.accumulate_grad_batches > 1:
        text += f" of {trainer.accumulate_grad_batches} accumulated batches"
    if trainer.global_step:
        text += f", resuming after step {trainer.global_step}"
    return text


def _logs(trainer: "Trainer") -> str:
    places = []
    for logger in trainer.loggers:
        place = getattr(logger, "path", None) or logger.log_dir or logger.save_dir
        places.append(f"{place} ({type(logger).__name__})" if place is not None else type(logger).__name__)
    return ", ".join(places) or "none (logger=False)"


def _checkpoints(trainer: "Trainer") -> str:
    from shardtrain.callbacks.checkpoint import ModelCheckpoint

    when = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.every_n_train_steps:
                when.append(f"every {callback.every_n_train_steps} steps")
            if callback.monitor:
                when.append(f"best {callback.save_top_k} by {callback.monitor}")
            if callback.save_on_train_end:
                when.append("at the end")
    if not when:
        where = f"{trainer.checkpoint_dir}/ on preemption only" if trainer.preemption else "none"
        return f"{where} (add a ModelCheckpoint callback to save during training)"
    return f"{trainer.checkpoint_dir}/ ({', '.join(dict.fromkeys(when))})"
