"""The Strategy interface: everything that differs between single device, DDP, FSDP, DeepSpeed.

A strategy is a small object that says *how* a module and its optimizers are placed on the
devices of a run. The Engine calls it; the Trainer never does. Subclasses override only the
steps where they differ from plain PyTorch on one device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from shardtrain.errors import ConfigError
from shardtrain.launch.environment import ClusterEnvironment
from shardtrain.launch.process_group import init_process_group
from shardtrain.precision import Precision
from shardtrain.strategies.materialize import has_meta_tensors, materialize


@dataclass(kw_only=True, slots=True)
class TrainingSettings:
    """What the training loop decides that a strategy may need to know (DeepSpeed writes it into its config)."""

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    micro_batch_size: int | None = None


class Strategy:
    """Base class and single-process behaviour; distributed strategies override what they need."""

    #: The name this strategy is registered under; ``strategy="<name>"`` selects it.
    name: ClassVar[str] = ""
    #: Whether the strategy needs more than one process to mean anything.
    distributed: ClassVar[bool] = False
    #: Whether a process group is needed even for one process (DTensor-based strategies).
    needs_process_group: ClassVar[bool] = False
    #: Whether the optimizer must exist before the module is set up (DeepSpeed) rather than after (FSDP).
    sets_up_optimizers_with_module: ClassVar[bool] = False
    #: Whether the loop may leave out an optimizer step and read the gradient norm before it;
    #: False where the strategy's engine owns the gradients and the step (DeepSpeed).
    can_skip_optimizer_step: ClassVar[bool] = True

    def __init__(self) -> None:
        self.environment: ClusterEnvironment | None = None
        self.device: torch.device = torch.device("cpu")
        self.precision: Precision = Precision()
        self.timeout: timedelta = timedelta(minutes=30)

    # ---------------------------------------------------------------- set-up
    def validate(self, world_size: int, device_type: str) -> None:
        """Reject options that cannot work, before any process is started."""

    def configure_training(self, settings: TrainingSettings) -> None:
        """Accept (or reject, with a ``ConfigError``) the loop's settings; before any process starts."""

    def connect(
        self, environment: ClusterEnvironment, device: torch.device, precision: Precision, timeout: timedelta
    ) -> None:
        """Bind the strategy to this process's place in the run (called once per process)."""
        self.environment = environment
        self.device = device
        self.precision = precision
        self.timeout = timeout

    def setup_environment(self) -> None:
        """Join the process group; runs in every process after launch."""
        assert self.environment is not None, "connect() first"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_process_group(self.environment, self.device, self.timeout, always=self.needs_process_group)

    @property
    def world_size(self) -> int:
        return self.environment.world_size if self.environment else 1

    @property
    def global_rank(self) -> int:
        return self.environment.global_rank if self.environment else 0

    # ---------------------------------------------------------------- model and optimizer
    def module_init_context(self) -> contextlib.AbstractContextManager:
        """Where ``configure_model()`` builds layers: on the device, in the parameter dtype."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.device)
        stack.enter_context(self.precision.module_init_context())
        return stack

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Place the module and wrap it for this strategy; returns what forward must be called on.

        A module built on the meta device is materialised here (see ``materialize``).
        """
        if has_meta_tensors(module):
            materialize(module, self.device)
        return self.precision.convert_module(module).to(self.device)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    def setup_module_and_optimizers(
        self, module: nn.Module, make_optimizers: Callable[[], Sequence[Optimizer]]
    ) -> tuple[nn.Module, list[Optimizer]]:
        """Set up ``module``, then the optimizers ``make_optimizers()`` builds on its (sharded) parameters.

        Strategies that need the optimizer first (``sets_up_optimizers_with_module``) override this.
        """
        wrapped = self.setup_module(module)
        return wrapped, [self.setup_optimizer(optimizer) for optimizer in make_optimizers()]

    def optimizer_zero_grad(self, optimizer: Optimizer, set_to_none: bool = True) -> None:
        optimizer.zero_grad(set_to_none=set_to_none)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.precision.forward_context(self.device.type)

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation while accumulating micro-batches."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, module: nn.Module | None = None) -> None:
        self.precision.scale_loss(loss).backward()

    def optimizer_step(self, optimizer: Optimizer) -> None:
        self.precision.optimizer_step(optimizer)

    def clip_gradients_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Clip by the norm of the *whole* gradient; returns that norm (a tensor, no host sync)."""
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type, foreach=True)

    def clip_gradients_value(self, parameters: Iterable[torch.Tensor], clip_value: float) -> None:
        torch.nn.utils.clip_grad_value_(list(parameters), clip_value, foreach=True)

    # State keyed by parameter names, the same for every strategy, so that a checkpoint saved
    # under one strategy loads under another. ``full=True`` gathers whole tensors (to the CPU);
    # ``full=False`` gives each rank its shards (DTensors under FSDP). Every rank must call these.
    def module_state_dict(self, module: nn.Module, full: bool = True) -> dict[str, Any]:
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=full, cpu_offload=full))

    def load_module_state_dict(
        self, module: nn.Module, state: dict[str, Any], strict: bool = True, full: bool = True
    ) -> None:
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=full, strict=strict))

    def optimizer_state_dict(self, module: nn.Module, optimizer: Optimizer, full: bool = True) -> dict[str, Any]:
        return get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=full, cpu_offload=full)
        )

    def load_optimizer_state_dict(
        self, module: nn.Module, optimizer: Optimizer, state: dict[str, Any], full: bool = True
    ) -> None:
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=full))

    # ---------------------------------------------------------------- collectives
    def _is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Reduce ``tensor`` over all ranks in place (``"mean"``, ``"sum"``, ``"max"``, ``"min"``)."""
        if not self._is_distributed():
            return tensor
        reduce_op = {
            "sum": dist.ReduceOp.SUM,
            "mean": dist.ReduceOp.SUM,
            "max": dist.ReduceOp.MAX,
            "min": dist.ReduceOp.MIN,
        }[op]
        dist.all_reduce(tensor, op=reduce_op)
        if op == "mean":
            tensor /= self.world_size
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack ``tensor`` from every rank along a new first dimension."""
        if not self._is_distributed():
            return tensor.unsqueeze(0)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return torch.stack(out)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self._is_distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self._is_distributed():
            dist.barrier()

    def teardown(self) -> None:
        """Release what the strategy holds for running its set-up model; called by ``Engine.teardown()``
        when ``fit``/``validate`` ends (after an exception too). The process group stays for the next
        fit/validate, and the set-up model's weights and optimizer state stay readable, so
        ``save_checkpoint()`` and ``module_state_dict()`` work after ``fit``. May be called twice.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def optimizer_parameters(optimizers: Sequence[Optimizer]) -> list[torch.Tensor]:
    """Every parameter that has a gradient, over all param groups of all optimizers."""
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.grad is not None]


def repoint_optimizer(optimizer: Optimizer, old_names: dict[int, str], new_parameters: dict[str, nn.Parameter]) -> None:
    """Make an optimizer built before set-up update the parameters the strategy put in place.

    Sharding (FSDP) and materialising a meta-device model replace parameters with new ones; an
    optimizer that still held the old tensors would train nothing, silently.
    """
    replaced = False
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            name = old_names.get(id(param))
            if name is not None and new_parameters.get(name) is not None and new_parameters[name] is not param:
                group["params"][index] = new_parameters[name]
                replaced = True
    if replaced and optimizer.state:
        raise ConfigError(
            "the optimizer already has state for parameters that set-up replaced (sharding); "
            "create it before its first step, or after engine.setup(model)"
        )
