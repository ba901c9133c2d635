"""Every hook of Lightning's ``LightningModule``, and what the Trainer does with each: one table.

A hook is either **called** where Lightning calls it (with Lightning's arguments), or **refused**
(overriding it is a ``ConfigError`` at the start of ``fit``/``validate``/``test``/``predict``, before any
process group, naming the hook), so nothing is skipped silently. ``check_module_hooks`` is the one check; ``tests/unit/test_lightning_hooks.py``
walks Lightning's own hook list against ``HOOKS`` so that a new Lightning hook cannot be missed,
and ``docs/lightning.md`` is checked against ``hooks_markdown()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from shardtrain.errors import ConfigError
from shardtrain.logged import current_hook
from shardtrain.overrides import overrides

CALLED, REFUSED = "called", "refused"


@dataclass(frozen=True, slots=True)
class Hook:
    kind: str
    #: Where it is called, why it is refused, or what to do instead.
    note: str


def _called(note: str) -> Hook:
    return Hook(CALLED, note)


def _refused(note: str = "not supported yet") -> Hook:
    return Hook(REFUSED, note)


_EVERY_STEP = "as in Lightning's fit"
HOOKS: dict[str, Hook] = {
    # -- building and optimizing
    "setup": _called(
        'setup(stage): "fit"/"validate"/"test"/"predict", after the DataModule\'s and the callbacks\' setup, before '
        "configure_model"
    ),
    "configure_model": _called("once per run, under the strategy's init context"),
    "configure_optimizers": _called("once, after configure_model"),
    "configure_sharded_model": _refused("removed in Lightning 2.x: rename it configure_model"),
    "configure_callbacks": _called(
        "at the start of every stage, before setup: its callbacks replace the Trainer's of the same type; checkpoint "
        "callbacks last"
    ),
    "prepare_data": _called(
        "at the start of every stage, after the DataModule's, before setup: on local rank 0 (global rank 0 with "
        "prepare_data_per_node = False); every rank waits for it"
    ),
    "teardown": _called(
        "teardown(stage): when a stage ends (after an exception too), after the DataModule's and the callbacks'"
    ),
    # -- the steps
    "forward": _called("by your steps (routed through the strategy's wrapped module)"),
    "training_step": _called(_EVERY_STEP),
    "validation_step": _called(_EVERY_STEP),
    "test_step": _called("by Trainer.test, per batch (with dataloader_idx when there are several loaders)"),
    "predict_step": _called("by Trainer.predict, per batch; its outputs are predict's result"),
    "train_dataloader": _called("when fit gets no train loader and no DataModule gives one"),
    "val_dataloader": _called("when fit/validate gets no val loader and no DataModule gives one"),
    "test_dataloader": _called("when test gets no loader and no DataModule gives one"),
    "predict_dataloader": _called("when predict gets no loader and no DataModule gives one"),
    # -- optimization (automatic optimization only, except backward's neighbours; manual: see manual_optimization)
    "backward": _called(
        "backward(loss) in place of loss.backward(), with the loss divided by accumulate_grad_batches and scaled (fp16), "
        "also from manual_backward(loss, *args, **kwargs); refused under deepspeed and pipeline stages, whose engine or "
        "schedule runs backward"
    ),
    "optimizer_step": _called(
        "automatic optimization: optimizer_step(epoch, batch_idx, optimizer, optimizer_closure) once per optimizer "
        "step; backward has "
        "already run, so the closure returns the loss without recomputing it; optimizer.step(closure=...) runs "
        "on_before_optimizer_step, gradient clipping and the strategy's step"
    ),
    "optimizer_zero_grad": _called(
        "automatic optimization: optimizer_zero_grad(epoch, batch_idx, optimizer) before the backward of each step's "
        "first micro-batch (after its training_step), as Lightning"
    ),
    "configure_gradient_clipping": _called(
        "automatic optimization: configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm) "
        "before each step, in "
        "place of the Trainer's clipping; self.clip_gradients(optimizer, ...) clips"
    ),
    "lr_scheduler_step": _called(
        "automatic optimization: lr_scheduler_step(scheduler, metric) in place of scheduler.step(...) when due"
    ),
    # -- batch transfer (shardtrain.batch_transfer): the DataModule's in place of the module's where it overrides one
    "on_before_batch_transfer": _called(
        "on_before_batch_transfer(batch, dataloader_idx) for each batch of every stage, before the batch-start hooks"
    ),
    "transfer_batch_to_device": _called(
        "transfer_batch_to_device(batch, device, dataloader_idx), after on_before_batch_transfer; its default moves "
        "every tensor"
    ),
    "on_after_batch_transfer": _called(
        "on_after_batch_transfer(batch, dataloader_idx), after transfer_batch_to_device, before the strategy splits "
        "the batch (pipeline micro-batches, context parallel sequences)"
    ),
    # -- on_* hooks the loop calls
    **{
        name: _called(_EVERY_STEP)
        for name in (
            "on_fit_start",
            "on_fit_end",
            "on_train_start",
            "on_train_end",
            "on_train_epoch_start",
            "on_train_epoch_end",
            "on_train_batch_start",
            "on_train_batch_end",
            "on_validation_start",
            "on_validation_end",
            "on_validation_epoch_start",
            "on_validation_epoch_end",
            "on_validation_batch_start",
            "on_validation_batch_end",
            *(
                f"on_{stage}_{event}"
                for stage in ("test", "predict")
                for event in ("start", "end", "epoch_start", "epoch_end", "batch_start", "batch_end")
            ),
            "on_before_backward",
            "on_after_backward",
            "on_before_optimizer_step",
            "on_before_zero_grad",
            "on_save_checkpoint",
            "on_load_checkpoint",
        )
    },
    **{
        f"on_{stage}_model_eval": _called(f"when {stage} starts, in place of putting the model in eval mode")
        for stage in ("validation", "test", "predict")
    },
    **{
        f"on_{stage}_model_train": _called(
            f"when {stage} ends, in place of putting each submodule back in the mode it was in"
        )
        for stage in ("validation", "test")
    },
    "on_validation_model_zero_grad": _called(
        "before each validation inside fit that does not fall inside a gradient accumulation; by default it frees "
        "the gradients, as Lightning's"
    ),
}

#: Attributes that change how Lightning trains; a value other than the default is refused.
#: (``automatic_optimization = False`` is supported: ``shardtrain.trainer.manual_optimization``.)
FLAGS: dict[str, tuple[Any, str]] = {}


def check_module_hooks(module: nn.Module, base: type) -> None:
    """Raise ``ConfigError`` naming every refused hook ``module`` overrides and every unsupported flag it sets."""
    problems = [
        f"{name} ({hook.note})"
        for name, hook in HOOKS.items()
        if hook.kind == REFUSED and overrides(module, name, base)
    ]
    problems += [
        f"{flag}={getattr(module, flag)!r} ({why})"
        for flag, (default, why) in FLAGS.items()
        if getattr(module, flag, default) != default
    ]
    if problems:
        raise ConfigError(
            f"{type(module).__name__} overrides Lightning hooks that shardtrain does not call, so they would be "
            f"ignored: {'; '.join(problems)}. Remove them, or see docs/lightning.md for what each is called in place"
        )


def backward_function(module: Any, base: type, *args: Any, **kwargs: Any) -> Callable[[Any], None] | None:
    """The module's Lightning ``backward(loss, *args, **kwargs)`` as the strategy's ``run_backward``; None where the
    module does not override it and there are no arguments to pass (the strategy's own ``loss.backward()``)."""
    if not args and not kwargs and not overrides(module, "backward", base):
        return None

    def run_backward(loss: Any) -> None:
        with current_hook(module, "backward"):
            module.backward(loss, *args, **kwargs)

    return run_backward


def check_backward_hook(module: Any, base: type, supported: bool, strategy: str) -> None:
    """Refuse an overridden ``backward`` where the strategy runs backward itself (it would be ignored)."""
    if not supported and overrides(module, "backward", base):
        raise ConfigError(
            f"{type(module).__name__} overrides backward, which strategy {strategy!r} does not call: its engine or "
            "pipeline schedule runs backward itself (Lightning ignores the hook under deepspeed with a warning), so "
            "it would be ignored. Remove it (on_before_backward/on_after_backward run around the backward), or use "
            "ddp, fsdp or model_parallel without pipeline stages"
        )


def hooks_markdown() -> str:
    """The table as docs/lightning.md shows it."""
    lines = ["| Hook | What shardtrain does |", "| --- | --- |"]
    for kind in (CALLED, REFUSED):
        for name, hook in sorted(HOOKS.items()):
            if hook.kind == kind:
                lines.append(f"| `{name}` | {kind}: {hook.note} |")
    return "\n".join(lines)


class StepOptimizer:
    """The ``optimizer`` a user's ``optimizer_step`` receives (Lightning's ``LightningOptimizer``): ``step(closure)``
    runs the closure, then ``take_step`` (the hooks before the step, clipping, and the strategy's step)."""

    def __init__(self, optimizer: Any, take_step: Callable[[], None]) -> None:
        self.__dict__["_optimizer"] = optimizer
        self.__dict__["_take_step"] = take_step

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        result = closure() if closure is not None else None
        self._take_step()
        return result

    @property
    def optimizer(self) -> Any:
        return self._optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_optimizer"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._optimizer, name, value)
