"""The Strategy interface: everything that differs between single device, DDP, FSDP, DeepSpeed.

A strategy is a small object that says *how* a module and its optimizers are placed on the
devices of a run. The Engine calls it; the Trainer never does.

``Strategy`` is abstract: a strategy must say how it places a module, how it computes the norm
of the whole gradient, and how it reads and writes state keyed by parameter names, because no
default is right for every layout (a sharded strategy that inherited single-device clipping
would clip by the norm of its own shard). The capability mixins in ``capabilities`` supply the
common answers: ``ReplicatedGradients`` / ``ShardedGradients`` for the norm,
``DistributedCheckpointState`` for torch's state-dict API, and ``BackwardSyncControl`` for
strategies that can skip gradient synchronisation while accumulating.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from shardtrain.errors import ConfigError
from shardtrain.launch.environment import ClusterEnvironment
from shardtrain.launch.process_group import init_process_group
from shardtrain.memory import ModelFootprint, StrategyMemory
from shardtrain.parallel.dims import ParallelDims
from shardtrain.precision import Precision
from shardtrain.strategies.capabilities import BackwardSyncControl
from shardtrain.parallel.materialize import has_meta_tensors, materialize

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(kw_only=True, slots=True)
class TrainingSettings:
    """What the training loop decides that a strategy may need to know (DeepSpeed writes it into its config)."""

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    micro_batch_size: int | None = None
    #: The module steps itself (``automatic_optimization = False``): backward runs inside its training step.
    manual_optimization: bool = False


class Strategy(abc.ABC):
    """How a module and its optimizers are placed on the run's devices; subclass it (and the
    capability mixins) to add a strategy, and register it with ``register_strategy``."""

    #: The name this strategy is registered under; ``strategy="<name>"`` selects it.
    name: ClassVar[str] = ""
    #: Whether a process group is needed even for one process (DTensor-based strategies).
    needs_process_group: ClassVar[bool] = False
    #: Whether the loop may leave out an optimizer step and read the gradient norm before it;
    #: False where the strategy's engine owns the gradients and the step (DeepSpeed).
    can_skip_optimizer_step: ClassVar[bool] = True
    #: Whether evaluation may run under ``torch.inference_mode`` (Lightning's ``inference_mode=True``); False where
    #: the strategy's modules gather or reshard parameters when they run (FSDP, DTensor, DeepSpeed ZeRO): there,
    #: tensors made under inference mode could end up in the training graph.
    supports_inference_mode: ClassVar[bool] = False
    #: Whether a module set up before ``teardown()`` still runs after it; False where teardown destroys what runs it
    #: (DeepSpeed's engine): an evaluation after ``fit`` then sets the module up again (``setup_module``).
    runs_modules_after_teardown: ClassVar[bool] = True

    @property
    def runs_batches_itself(self) -> bool:
        """Whether ``forward_backward`` runs the batch through the strategy's own schedule without calling the
        loop's ``compute_loss`` (pipeline parallelism): a loop then does per step before it what it would do
        inside ``compute_loss`` (zeroing the gradients)."""
        return False

    def __init__(self) -> None:
        self.environment: ClusterEnvironment | None = None
        self.device: torch.device = torch.device("cpu")
        self.precision: Precision = self.make_precision("32-true")
        self.timeout: timedelta = timedelta(minutes=30)
        self.training = TrainingSettings()
        #: The run's parallel dims (the mesh's degrees), what ``make_parallel_dims`` returned; set by ``connect``.
        self.parallel_dims: ParallelDims | None = None
        self._mesh_source: Callable[[], "DeviceMesh"] | None = None

    # ---------------------------------------------------------------- set-up, before any process starts
    def validate(self, world_size: int, device_type: str) -> None:
        """Reject options that cannot work, before any process is started."""

    def make_parallel_dims(self, world_size: int, local_world_size: int) -> ParallelDims:
        """The parallel dims (degrees) this strategy lays the run out with; by default every rank is a data-parallel
        replica (DDP). Raise ``ConfigError`` for a layout the strategy cannot use."""
        return ParallelDims(world_size=world_size, dp_replicate=world_size, dp_shard=1)

    def check_module(self, module: nn.Module, parallel_dims: ParallelDims) -> None:
        """Reject a model this strategy cannot train on ``parallel_dims``, before any process group: from what
        the module says of itself (its config), since ``configure_model()`` has not built it yet."""

    def make_precision(self, name: str | int) -> Precision:
        """The object that implements the run's precision for this strategy (DeepSpeed has its own)."""
        return Precision(name)

    def configure_precision(self, name: str | int) -> None:
        """Use the precision named ``name``; the strategy is its one owner (the Engine reads it from here)."""
        self.precision = self.make_precision(name)

    def configure_training(self, settings: TrainingSettings) -> None:
        """Accept (or reject, with a ``ConfigError``) the loop's settings; before any process starts."""
        self.training = settings

    # ---------------------------------------------------------------- in each process
    def connect(
        self,
        environment: ClusterEnvironment,
        device: torch.device,
        timeout: timedelta,
        parallel_dims: ParallelDims | None = None,
        mesh: Callable[[], "DeviceMesh"] | None = None,
    ) -> None:
        """Bind the strategy to this process's place in the run (called once per process).

        ``mesh`` builds (once, on first call) the device mesh of ``parallel_dims``; the Engine owns both.
        """
        self.environment = environment
        self.device = device
        self.timeout = timeout
        self.parallel_dims = parallel_dims or self.make_parallel_dims(
            environment.world_size, environment.local_world_size
        )
        self._mesh_source = mesh

    def setup_environment(self) -> None:
        """Join the process group; runs in every process after launch."""
        assert self.environment is not None, "connect() first"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_process_group(self.environment, self.device, self.timeout, always=self.needs_process_group)

    @property
    def device_mesh(self) -> "DeviceMesh":
        """The run's device mesh, named by ``shardtrain.parallel.dims.MESH_DIMS`` (built on first use)."""
        if self._mesh_source is None:
            assert self.parallel_dims is not None, "connect() first"
            mesh = self.parallel_dims.build_mesh(self.device.type)
            self._mesh_source = lambda: mesh
        return self._mesh_source()

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

    @abc.abstractmethod
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Place the module and wrap it for this strategy; returns what forward must be called on.

        A module built on the meta device must be materialised here (``place_module`` does both
        for strategies that keep whole replicas).
        """

    def place_module(self, module: nn.Module) -> nn.Module:
        """Materialise a meta-device module, convert it to the parameter dtype and move it to the device."""
        if has_meta_tensors(module):
            materialize(module, self.device)
        return self.precision.convert_module(module).to(self.device)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    def setup_module_and_optimizers(
        self, module: nn.Module, make_optimizers: Callable[[], Sequence[Optimizer]]
    ) -> tuple[nn.Module, list[Optimizer]]:
        """Set up ``module``, then the optimizers ``make_optimizers()`` builds on its (sharded) parameters.

        Strategies that need the optimizer first (DeepSpeed) override this.
        """
        wrapped = self.setup_module(module)
        return wrapped, [self.setup_optimizer(optimizer) for optimizer in make_optimizers()]

    def optimizer_zero_grad(self, optimizer: Optimizer, set_to_none: bool = True) -> None:
        optimizer.zero_grad(set_to_none=set_to_none)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.precision.forward_context(self.device.type)

    def step_context(self, module: nn.Module, method: str, args: tuple) -> contextlib.AbstractContextManager:
        """The context the module's ``method`` (a step, or ``forward``) runs in besides ``forward_context``; ``args``
        are its arguments (a step's first is the batch). Under context parallelism an evaluation step's sequences
        are split over the ranks here (``splits_evaluation``)."""
        return contextlib.nullcontext()

    @property
    def splits_evaluation(self) -> bool:
        """Whether validation and test steps run on this rank's parts of each sequence (context parallelism):
        what they log is combined over the ranks holding the other parts (``combine_sequence_parts``)."""
        return False

    def combine_sequence_parts(self, values: torch.Tensor, op: str) -> torch.Tensor:
        """``values`` computed on this rank's parts of the sequences, combined (``op``: ``"mean"``, ``"sum"``,
        ``"max"``, ``"min"``) over the ranks that hold the other parts; unchanged where sequences are not split."""
        return values

    # ---------------------------------------------------------------- the step
    def forward_backward(
        self,
        module: nn.Module,
        compute_loss: Callable[[], tuple[torch.Tensor, Any]],
        *,
        synchronize: bool,
        batch: Any = None,
        run_backward: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Run one micro-batch: forward (``compute_loss()`` returns the loss and the step's outputs)
        and backward of the loss divided by ``training.accumulate_grad_batches`` (through ``run_backward``
        when given, see ``backward``); gradients are synchronised only when ``synchronize`` (the last
        micro-batch of an optimizer step).

        Returns the undivided loss, detached, and the outputs. This is the hook a strategy that
        owns the step's schedule (pipeline parallelism) overrides: it runs ``batch`` itself.
        """
        skip_sync = (
            self.no_backward_sync(module, True)
            if not synchronize and isinstance(self, BackwardSyncControl)
            else contextlib.nullcontext()
        )
        with skip_sync:
            loss, outputs = compute_loss()
            accumulation = self.training.accumulate_grad_batches
            divided = loss / accumulation if accumulation > 1 else loss
            if run_backward is None:
                self.backward(divided, module)
            else:
                self.backward(divided, module, run_backward=run_backward)
        return loss.detach(), outputs

    def backward(
        self,
        loss: torch.Tensor,
        module: nn.Module | None = None,
        run_backward: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Backward of ``loss`` scaled by the precision (fp16's gradient scaler); ``run_backward(scaled_loss)`` runs
        it in place of ``scaled_loss.backward()`` (a module's Lightning ``backward`` hook) where
        ``supports_custom_backward``."""
        scaled = self.precision.scale_loss(loss)
        if run_backward is None:
            scaled.backward()
        else:
            run_backward(scaled)

    @property
    def supports_custom_backward(self) -> bool:
        """Whether ``backward`` may be given a ``run_backward`` (False where an engine or a schedule of the strategy's
        own runs backward: DeepSpeed, pipeline stages)."""
        return True

    def optimizer_step(self, optimizer: Optimizer) -> None:
        self.precision.optimizer_step(optimizer)

    @abc.abstractmethod
    def gradient_norm(self, parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor | None:
        """The norm of the *whole* gradient (over every shard and rank), as a tensor (no host sync);
        None where it is known only after the optimizer step (DeepSpeed)."""

    def clip_gradients_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """Clip by the norm of the whole gradient; returns that norm."""
        parameters = list(parameters)
        norm = self.gradient_norm(parameters, norm_type)
        assert norm is not None, f"{type(self).__name__} must override clip_gradients_norm"
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)
        return norm

    def clip_gradients_value(self, parameters: Iterable[torch.Tensor], clip_value: float) -> None:
        torch.nn.utils.clip_grad_value_(list(parameters), clip_value, foreach=True)

    # State keyed by parameter names, the same for every strategy, so that a checkpoint saved
    # under one strategy loads under another. ``full=True`` gathers whole tensors (to the CPU);
    # ``full=False`` gives each rank its shards (DTensors under FSDP). Every rank must call these.
    @abc.abstractmethod
    def module_state_dict(self, module: nn.Module, full: bool = True) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_module_state_dict(
        self, module: nn.Module, state: dict[str, Any], strict: bool = True, full: bool = True
    ) -> None: ...

    @abc.abstractmethod
    def optimizer_state_dict(self, module: nn.Module, optimizer: Optimizer, full: bool = True) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_optimizer_state_dict(
        self, module: nn.Module, optimizer: Optimizer, state: dict[str, Any], full: bool = True
    ) -> None: ...

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

    def estimate_memory(self, footprint: ModelFootprint) -> StrategyMemory | None:
        """Bytes one device (and its host) needs to train a model of ``footprint`` with this strategy.

        ``None`` (the default) means no formula, or none for ``footprint``'s layout:
        ``shardtrain.estimate_memory`` then leaves this strategy out of its table, and
        ``strategy="auto"`` never picks it. The estimator names the row as the strategy is registered.
        """
        return None

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
