"""What ``Engine.setup`` returns: the user's module and optimizers, running through the strategy.

``EngineModule`` routes a user's step methods through the strategy-wrapped module's ``forward``.

DDP's gradient synchronisation and FSDP's unshard/reshard hooks run on the wrapped module's
``forward``. A ``training_step`` that calls submodules directly would skip them (DDP then trains
with unsynchronised gradients). So the strategy wraps a ``ForwardRouter`` whose ``forward``
dispatches to any method of the user's module, and ``EngineModule.training_step(...)`` becomes a
call of the wrapped ``forward``.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn
from torch.optim import Optimizer

from shardtrain.strategies.base import Strategy

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_METHOD_KEY = "_shardtrain_method"


class ForwardRouter(nn.Module):
    """``forward(*args, _shardtrain_method=name)`` calls ``module.<name>(*args)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        method = kwargs.pop(_METHOD_KEY, "forward")
        return getattr(self.module, method)(*args, **kwargs)


class EngineModule(nn.Module):
    """What ``Engine.setup`` returns: behaves like the user's module, runs through the strategy.

    ``state_dict()`` and attribute access refer to the user's module (no wrapper prefixes);
    ``forward`` and the step methods run through the strategy's wrapper under its precision.
    """

    def __init__(self, forward_module: nn.Module, original_module: nn.Module, strategy: Strategy) -> None:
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module
        self._strategy = strategy
        self._forward_methods: set[str] = {
            name for name in STEP_METHODS if callable(getattr(original_module, name, None))
        }

    @property
    def module(self) -> nn.Module:
        """The user's module, unwrapped (its parameters may be sharded)."""
        return self._original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward", *args, **kwargs)

    def mark_forward_method(self, name: str) -> None:
        """Also route ``name`` through the wrapped forward (for custom step methods)."""
        if not callable(getattr(self._original_module, name, None)):
            raise AttributeError(f"{type(self._original_module).__name__} has no method {name!r}")
        self._forward_methods.add(name)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        precision = self._strategy.precision
        args, kwargs = precision.convert_input((args, kwargs))
        strategy = self._strategy
        with strategy.forward_context(), strategy.step_context(self._forward_module, method, args):
            output = self._forward_module(*args, **kwargs, **{_METHOD_KEY: method})
        return precision.convert_output(output)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if name in self.__dict__.get("_forward_methods", ()):

            def routed(*args: Any, **kwargs: Any) -> Any:
                return self._call(name, *args, **kwargs)

            return routed
        return getattr(self._original_module, name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._original_module.load_state_dict(*args, **kwargs)


class EngineOptimizer:
    """The user's optimizer with ``step()`` routed through the strategy (loss scaling, DeepSpeed).

    It is an instance of the user's optimizer class, sharing its parameter groups and state, so
    LR schedulers can be built on it. Like ``EngineModule`` (and Lightning Fabric's ``_FabricOptimizer``)
    it holds the strategy, not the Engine.
    """

    def __init__(self, optimizer: Optimizer, strategy: Strategy) -> None:
        skipped = ("step", "__del__", *_SHARED_WITH_OPTIMIZER)
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in skipped}
        self.__class__ = type("Engine" + type(optimizer).__name__, (EngineOptimizer, type(optimizer)), {})
        self._optimizer = optimizer
        self._strategy = strategy

    # The parameter groups, state and defaults are the optimizer's own, read through on every access, not copies:
    # ``load_state_dict`` (a resume) replaces the optimizer's lists, and an LR scheduler built on this wrapper must
    # then change the groups the optimizer steps with (a copy kept the old ones: the schedule stopped at the resume).
    param_groups = property(
        lambda self: self._optimizer.param_groups, lambda self, value: setattr(self._optimizer, "param_groups", value)
    )
    state = property(lambda self: self._optimizer.state, lambda self, value: setattr(self._optimizer, "state", value))
    defaults = property(
        lambda self: self._optimizer.defaults, lambda self, value: setattr(self._optimizer, "defaults", value)
    )

    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            closure()
        optimizer_step(self._strategy, self._optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        self._strategy.optimizer_zero_grad(self._optimizer, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state_dict)


_SHARED_WITH_OPTIMIZER = ("param_groups", "state", "defaults")


def optimizer_step(strategy: Strategy, *optimizers: Optimizer) -> None:
    """Step ``optimizers`` as ``strategy`` does, then update the loss scale once (``Engine.step``, ``optimizer.step()``)."""
    for optimizer in optimizers:
        strategy.optimizer_step(optimizer.optimizer if isinstance(optimizer, EngineOptimizer) else optimizer)
    strategy.precision.update()
