"""Manual optimization (Lightning's ``automatic_optimization = False``): the module steps its optimizers itself.

The Trainer then calls ``training_step(batch, batch_idx)`` and nothing around it: no backward, no step, no
zero_grad, no clipping and no scheduler step of its own. The module uses ``self.optimizers()`` (each wrapped in a
:class:`ManualOptimizer`, Lightning's ``LightningOptimizer``), ``self.manual_backward(loss)``,
``self.clip_gradients(...)``, ``self.toggle_optimizer(...)`` and ``self.lr_schedulers()``.

Gradient synchronisation: a manual step may call backward several times, on different parts of the model, with
parameters frozen in between (``toggle_optimizer``): DDP's reducer expects exactly one backward per forward over
every parameter. So under DDP the backward passes stay local (``Engine.local_gradients``) and the gradients an
optimizer reads are averaged over the ranks just before they are read (clipping, ``on_before_optimizer_step``,
the step): one all-reduce per optimizer step. Averaging is linear and leaves already-averaged gradients
unchanged, so this equals DDP's averaging in each backward. FSDP and DeepSpeed reduce in each backward as usual.

``global_step`` counts optimizer steps, as Lightning counts them in manual mode: two optimizers stepped per batch
advance it by two, and ``max_steps`` stops on that count.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from shardtrain.errors import ConfigError
from shardtrain.module import TrainModule
from shardtrain.trainer.hooks import backward_function, overrides

if TYPE_CHECKING:
    from shardtrain.trainer.arguments import TrainerArguments
    from shardtrain.trainer.trainer import Trainer

#: Hooks the Trainer calls only in automatic optimization; overriding one in manual mode would be ignored.
AUTOMATIC_ONLY_HOOKS = ("optimizer_step", "optimizer_zero_grad", "configure_gradient_clipping", "lr_scheduler_step")


def is_manual(module: Any) -> bool:
    """Whether ``module`` optimizes manually (``automatic_optimization = False``)."""
    return getattr(module, "automatic_optimization", True) is False


def check_manual_optimization(module: TrainModule, args: TrainerArguments, base: type) -> None:
    """Refuse what manual optimization cannot honour, before any process group (Lightning's errors and fixes)."""
    if not is_manual(module):
        return
    if args.gradient_clip_val is not None:
        raise ConfigError(
            "Automatic gradient clipping is not supported for manual optimization. Remove "
            f"`Trainer(gradient_clip_val={args.gradient_clip_val})` and call self.clip_gradients(optimizer, ...) in "
            "training_step, or switch to automatic optimization."
        )
    if args.accumulate_grad_batches != 1:
        raise ConfigError(
            "Automatic gradient accumulation is not supported for manual optimization. Remove "
            f"`Trainer(accumulate_grad_batches={args.accumulate_grad_batches})` and step every few batches in "
            "training_step, or switch to automatic optimization."
        )
    if args.on_nonfinite != "ignore":
        raise ConfigError(
            f"Trainer(on_nonfinite={args.on_nonfinite!r}) checks the loss of automatic optimization; with "
            "automatic_optimization = False the module steps itself: remove on_nonfinite and check the loss in "
            "training_step"
        )
    ignored = [name for name in AUTOMATIC_ONLY_HOOKS if overrides(module, name, base)]
    if ignored:
        raise ConfigError(
            f"{type(module).__name__} sets automatic_optimization = False and overrides {', '.join(ignored)}, which "
            "the Trainer calls only in automatic optimization: remove them and do that work in training_step"
        )


class ManualOptimizer:
    """What ``self.optimizers()`` returns (Lightning's ``LightningOptimizer``): the set-up optimizer, with ``step``
    running the closure, ``on_before_optimizer_step`` and the strategy's step (counted in ``global_step``).

    Every other attribute (``param_groups``, ``state``, ``state_dict()``) is the optimizer's own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, loop: ManualOptimization) -> None:
        self.__dict__["_optimizer"] = optimizer
        self.__dict__["_loop"] = loop

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer this wraps (the one set up by the strategy; an instance of your optimizer class)."""
        return self._optimizer

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """Run ``closure`` (if given; it may compute the loss and call ``manual_backward``), then
        ``on_before_optimizer_step`` and the strategy's step; returns what the closure returned."""
        if kwargs:
            raise ConfigError(f"optimizer.step() takes only closure in shardtrain, got {sorted(kwargs)}")
        return self._loop.step(self._optimizer, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def toggle_model(self, sync_grad: bool = True) -> Iterator[None]:
        """Only this optimizer's parameters require gradients inside (``toggle_optimizer``/``untoggle_optimizer``).
        ``sync_grad=False`` is refused: shardtrain synchronises gradients when they are read, not in backward."""
        if not sync_grad:
            raise ConfigError(
                "toggle_model(sync_grad=False) is not supported: under DDP shardtrain averages the gradients once, "
                "at the optimizer step, so accumulating without synchronisation needs nothing; drop sync_grad"
            )
        module = self._loop.module
        module.toggle_optimizer(self)
        try:
            yield
        finally:
            module.untoggle_optimizer(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_optimizer"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._optimizer, name, value)

    def __repr__(self) -> str:
        return f"ManualOptimizer({self._optimizer!r})"


class ManualOptimization:
    """The Trainer's side of manual optimization: runs a training step and serves the module's calls."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.wrapped = [ManualOptimizer(optimizer, self) for optimizer in trainer.optimizers]
        self._backward_calls = 0
        #: For each optimizer (by id), the backward count when its gradients were last averaged over the ranks.
        self._synchronized_at: dict[int, int] = {}

    @property
    def module(self) -> TrainModule:
        assert self.trainer.module is not None
        return self.trainer.module

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """The module's ``training_step`` through the strategy's wrapped forward, backward passes kept local
        where gradients are averaged at the step (DDP)."""
        trainer = self.trainer
        with trainer.engine.local_gradients(trainer.model):
            return trainer.model.training_step(*self.module._step_arguments("training_step", batch, batch_idx))

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """``manual_backward``: ``on_before_backward``, the strategy's backward (loss scaling, DeepSpeed's engine,
        FSDP's reduce-scatter; the module's ``backward(loss, *args, **kwargs)`` hook where it overrides it or there are
        arguments), ``on_after_backward``."""
        self.trainer._call("on_before_backward", loss)
        run_backward = backward_function(self.module, TrainModule, *args, **kwargs)
        self.trainer.engine.backward(loss, self.trainer.model, run_backward)
        self._backward_calls += 1
        self.trainer._call("on_after_backward")

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Average ``optimizer``'s gradients over the ranks if a backward ran since they last were (DDP only)."""
        if self._synchronized_at.get(id(optimizer)) != self._backward_calls:
            self.trainer.engine.synchronize_gradients(optimizer)
            self._synchronized_at[id(optimizer)] = self._backward_calls

    def clip_gradients(self, optimizer: Any, clip_val: float, algorithm: str) -> None:
        optimizer = unwrap(optimizer)
        self.synchronize(optimizer)
        engine, model = self.trainer.engine, self.trainer.model
        if algorithm == "norm":
            engine.clip_gradients(model, optimizer, max_norm=clip_val)
        else:
            engine.clip_gradients(model, optimizer, clip_val=clip_val)

    def step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
        result = closure() if closure is not None else None
        self.synchronize(optimizer)
        self.trainer._call("on_before_optimizer_step", optimizer)
        self.trainer.engine.step(optimizer)
        self.trainer.global_step += 1
        return result

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        found = self.wrapped if use_pl_optimizer else list(self.trainer.optimizers)
        return found[0] if len(found) == 1 else found


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The set-up optimizer behind a :class:`ManualOptimizer` (or the optimizer itself)."""
    return optimizer.optimizer if isinstance(optimizer, ManualOptimizer) else optimizer
