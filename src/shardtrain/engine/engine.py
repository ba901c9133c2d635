"""The Engine: the low-level layer for people who write their own training loop.

Everything that depends on the strategy is behind these methods; a loop written against the
Engine runs unchanged on one CPU, under DDP on 8 GPUs, or sharded with FSDP::

    engine = Engine(devices=2, strategy="ddp")
    engine.launch()
    model, optimizer = engine.setup(model, optimizer)
    for batch in engine.setup_dataloaders(loader):
        loss = model(batch).mean()
        engine.backward(loss)
        engine.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar, overload

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from shardtrain.engine.checkpoint import TrainingStateIO
from shardtrain.data import DeviceDataLoader, move_to_device, with_distributed_sampler
from shardtrain.utilities import rank_zero_only
from shardtrain.errors import ConfigError, RankFailedError
from shardtrain.estimate.auto import choose_for_module, is_auto, provisional_strategy
from shardtrain.launch.environment import ClusterEnvironment
from shardtrain.launch import heartbeat
from shardtrain.launch.failures import explain_failure
from shardtrain.launch.processes import RunProcesses
from shardtrain.parallel.dims import ParallelDims
from shardtrain.precision import Precision
from shardtrain.engine.rank_agreement import check_ranks_built_the_same
from shardtrain.seed import seed_everything
from shardtrain.strategies import Strategy, create_strategy
from shardtrain.strategies.base import TrainingSettings, optimizer_parameters, repoint_optimizer
from shardtrain.strategies.capabilities import BackwardSyncControl, ReplicatedGradients
from shardtrain.engine.wrapper import EngineModule, EngineOptimizer, ForwardRouter, optimizer_step

log = logging.getLogger(__name__)
T = TypeVar("T")
LossFunction = Callable[[], tuple[torch.Tensor, Any]]
OnCommit = Callable[[Path], None] | None


class Engine:
    """Launch processes, place a model and optimizers with a strategy, and train them.

    Args:
        accelerator: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        devices: processes per node (one per GPU on CUDA); ``"auto"``: what torchrun or SLURM started,
            else every visible GPU on CUDA and one process on the CPU (a number must match a launcher's).
        num_nodes: machines in the run (under torchrun or SLURM, it must match theirs).
        strategy: a registered name (``"single"``, ``"ddp"``, ...; see ``available_strategies()``),
            ``"auto"`` (chosen from a memory estimate when the model is set up), or a ``Strategy`` object.
        precision: ``"32-true"``, ``"bf16-mixed"``, ``"bf16-true"`` or ``"16-mixed"`` (see ``shardtrain.precision``).
        timeout_seconds: how long a collective may wait for the other ranks before the run fails.
        hang_timeout_seconds: seconds without progress on any rank (``progress``) after which the run reports
            which rank the others wait for, with every rank's stack, and ends (exit code 124); default
            ``max(0.8 x timeout_seconds, timeout_seconds - 60)`` (see ``shardtrain.launch.heartbeat``).
    """

    def __init__(
        self,
        accelerator: Literal["auto", "cpu", "cuda"] | str = "auto",
        devices: int | Literal["auto"] = "auto",
        num_nodes: int = 1,
        strategy: str | Strategy = "auto",
        precision: str | int = "32-true",
        timeout_seconds: float = 1800.0,
        hang_timeout_seconds: float | None = None,
    ) -> None:
        if hang_timeout_seconds is not None and not hang_timeout_seconds > 0:
            raise ConfigError(f"hang_timeout_seconds must be a number of seconds > 0, got {hang_timeout_seconds!r}")
        self._hang_timeout = hang_timeout_seconds
        self._processes = RunProcesses(accelerator, devices, num_nodes)
        self.accelerator = self._processes.accelerator
        self._precision_name = Precision(precision).name
        self.timeout = timedelta(seconds=timeout_seconds)
        self._training = TrainingSettings()
        #: ``strategy="auto"``: a provisional choice until ``choose_strategy(module)`` decides from the model.
        self._strategy_is_auto = is_auto(strategy)
        strategy = provisional_strategy(strategy, self.environment.world_size)
        self._mesh: Any = None
        self.strategy: Strategy = self._prepare(create_strategy(strategy))
        self._launched = False
        self._modules: list[nn.Module] = []
        self._module_of_optimizer: dict[int, nn.Module] = {}  # where parameters cannot tell (ZeRO flattens them)
        self._checkpoints = TrainingStateIO(lambda: self.strategy, self._modules, self._module_of_optimizer)
        self._modules_torn_down = 0  # how many of self._modules the strategy's teardown has seen

    def _prepare(self, strategy: Strategy) -> Strategy:
        """Give ``strategy`` the run's precision and settings and check its layout: before any process starts."""
        strategy.configure_precision(self._precision_name)
        strategy.validate(self.world_size, self.accelerator)
        strategy.configure_training(self._training)
        self.parallel_dims: ParallelDims = strategy.make_parallel_dims(
            self.world_size, self.environment.local_world_size
        )
        self._mesh = None  # the mesh of another strategy's layout, if any, is not this one's
        return strategy

    # ------------------------------------------------------------------ processes
    def launch(self, function: Callable[..., T] | None = None, *args: Any, **kwargs: Any) -> T | None:
        """Start the processes of the run (if not already started) and join the process group; with
        ``function``, call ``function(engine, *args, **kwargs)`` in every process and return its result."""
        if not self._launched:
            self._processes.start()
            self._connect(self.strategy)
            heartbeat.start(self._hang_timeout, self.timeout.total_seconds())
            self._launched = True
            rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]  # user code's @rank_zero_only
        return function(self, *args, **kwargs) if function is not None else None

    def _connect(self, strategy: Strategy) -> None:
        strategy.connect(
            self.environment, self._processes.device, self.timeout, self.parallel_dims, lambda: self.device_mesh
        )
        strategy.setup_environment()

    @property
    def device_mesh(self) -> Any:
        """The run's ``DeviceMesh``, named by ``parallel.dims.MESH_DIMS`` (built on first use; every rank must ask)."""
        self._require_launched("device_mesh")
        if self._mesh is None:
            self._mesh = self.parallel_dims.build_mesh(self.device.type)
        return self._mesh

    def choose_strategy(self, module: nn.Module) -> str | None:
        """Under ``strategy="auto"``, choose the strategy for ``module`` from its memory estimate before its
        ``configure_model()`` runs; returns why, else None. The one place, with ``__init__``, that resolves it."""
        if not self._strategy_is_auto:
            return None
        if self._modules:
            raise RuntimeError("choose_strategy() must come before setup(): a model is already placed")
        name, reason = choose_for_module(module, self.environment, self._precision_name, self.accelerator)
        self._strategy_is_auto = False
        if name != self.strategy.name:
            self.strategy = self._prepare(create_strategy(name))
            if self._launched:
                self._connect(self.strategy)
        log.info("strategy='auto' chose %s", reason)
        self.print(f"[shardtrain] strategy='auto' chose {reason}", flush=True)
        return reason

    def check_module(self, module: nn.Module) -> None:
        """Reject a model the strategy cannot train on this layout (before ``launch()``: no process group yet)."""
        self.strategy.check_module(module, self.parallel_dims)

    def configure_training(
        self,
        *,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        micro_batch_size: int | None = None,
        manual_optimization: bool = False,
    ) -> None:
        """Tell the strategy how the loop will train (DeepSpeed writes it into its config;
        ``forward_backward`` divides the loss by the accumulation steps). Optional for custom loops;
        raises ``ConfigError`` for settings the strategy cannot honour, before any process group exists.
        ``manual_optimization``: the loop's training step runs backward itself (FSDP then shards every child)."""
        settings = dict(
            accumulate_grad_batches=accumulate_grad_batches,
            micro_batch_size=micro_batch_size,
            manual_optimization=manual_optimization,
        )
        self._training = TrainingSettings(
            **settings, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )
        self.strategy.configure_training(self._training)

    @property
    def environment(self) -> ClusterEnvironment:
        return self._processes.environment

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def precision(self) -> Precision:
        """The run's precision as the strategy implements it (the strategy owns it)."""
        return self.strategy.precision

    @property
    def global_rank(self) -> int:
        return self.environment.global_rank

    @property
    def local_rank(self) -> int:
        return self.environment.local_rank

    @property
    def node_rank(self) -> int:
        return self.environment.node_rank

    @property
    def world_size(self) -> int:
        return self.environment.world_size

    @property
    def data_parallel_rank(self) -> int:
        """Which of the step's ``data_parallel_size`` batches this rank reads (one per TP/PP group)."""
        return self.parallel_dims.data_parallel_rank(self.global_rank)

    @property
    def data_parallel_size(self) -> int:
        """How many different batches one step reads; the global batch is ``batch_size`` times this."""
        return self.parallel_dims.data_parallel_size

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_global_zero:
            print(*args, **kwargs)

    seed_everything = staticmethod(seed_everything)

    # ------------------------------------------------------------------ model, optimizers, data
    def init_module(self) -> contextlib.AbstractContextManager:
        """Build a model under this context to create it where the strategy wants it (device, dtype, or meta)."""
        self._require_launched("init_module")
        return self.strategy.module_init_context()

    @overload
    def setup(self, module: nn.Module) -> EngineModule: ...
    @overload
    def setup(self, module: nn.Module, *optimizers: Optimizer) -> tuple[Any, ...]: ...
    def setup(self, module: nn.Module, *optimizers: Optimizer) -> Any:
        """Place ``module`` (and its optimizers) for the strategy; returns them wrapped, in the same order.
        Optimizers built before set-up are re-pointed at the parameters the strategy put in place."""
        if not optimizers:
            return self.setup_module(module)
        names = {id(param): name for name, param in module.named_parameters(remove_duplicate=False)}

        def given() -> list[Optimizer]:
            for optimizer in optimizers:
                repoint_optimizer(optimizer, names, dict(module.named_parameters(remove_duplicate=False)))
            return list(optimizers)

        wrapped, wrapped_optimizers = self.setup_module_and_optimizers(module, given)
        return (wrapped, *wrapped_optimizers)

    def setup_module_and_optimizers(
        self, module: nn.Module, make_optimizers: Callable[[], Sequence[Optimizer]]
    ) -> tuple[EngineModule, list[EngineOptimizer]]:
        """Set up ``module`` and the optimizers ``make_optimizers()`` builds (once, on real parameters),
        in the order the strategy needs: after FSDP shards the model, or before DeepSpeed takes both."""
        self._require_launched("setup")
        settings = {"strategy": self.strategy.name, "precision": self.precision.name, "training": repr(self._training)}
        check_ranks_built_the_same(module, settings)
        self.precision.grad_scaler(self.device.type)
        forward_module, optimizers = self.strategy.setup_module_and_optimizers(ForwardRouter(module), make_optimizers)
        self._modules.append(module)
        self._module_of_optimizer.update({id(optimizer): module for optimizer in optimizers})
        return EngineModule(forward_module, module, self.strategy), [
            EngineOptimizer(optimizer, self.strategy) for optimizer in optimizers
        ]

    def setup_module(self, module: nn.Module) -> EngineModule:
        """Place ``module`` alone (for evaluation, or optimizers set up after it: ``setup_optimizers``)."""
        return self.setup_module_and_optimizers(module, list)[0]

    def setup_optimizers(self, *optimizers: Optimizer) -> list[EngineOptimizer]:
        self._require_launched("setup")
        self.precision.grad_scaler(self.device.type)
        return [EngineOptimizer(self.strategy.setup_optimizer(optimizer), self.strategy) for optimizer in optimizers]

    def setup_dataloaders(
        self,
        *loaders: DataLoader,
        use_distributed_sampler: bool = True,
        seed: int = 0,
        pad_to_equal: bool = True,
        shuffle: bool | None = None,
        transfer: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Give each data-parallel rank its share of the data and move batches to the device. ``pad_to_equal=False``
        (prediction): no sample is repeated to give every rank as many as the others (ranks may differ by one).
        ``shuffle`` overrides the loaders' own shuffling (None: keep it; see ``with_distributed_sampler``).
        ``transfer(batch)`` takes each batch to the device in place of moving every tensor in it (the Trainer's
        batch-transfer hooks, ``shardtrain.batch_transfer``)."""
        self._require_launched("setup_dataloaders")
        share = (self.data_parallel_size, self.data_parallel_rank, seed, shuffle)
        out = [
            DeviceDataLoader(
                with_distributed_sampler(loader, *share, pad_to_equal=pad_to_equal)
                if use_distributed_sampler
                else loader,
                self.device,
                transfer=transfer,
            )
            for loader in loaders
        ]
        return out[0] if len(out) == 1 else out

    def to_device(self, obj: T) -> T:
        return move_to_device(obj, self.device)

    def load_weights(
        self, module: EngineModule | nn.Module, weights: dict[str, torch.Tensor], strict: bool = True
    ) -> None:
        """Load whole (unsharded) weights keyed by parameter names into a set-up module; every rank
        gives the same ``weights`` and keeps its own part. Every rank must call this."""
        target = module.module if isinstance(module, EngineModule) else module
        self.strategy.load_module_state_dict(target, weights, strict=strict, full=True)

    # ------------------------------------------------------------------ the step
    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision's compute context, for code that runs outside a set-up module's forward."""
        return self.strategy.forward_context()

    def no_backward_sync(self, module: EngineModule, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation for a micro-batch that only accumulates (where the strategy can)."""
        if not isinstance(self.strategy, BackwardSyncControl):
            return contextlib.nullcontext()
        return self.strategy.no_backward_sync(module._forward_module, enabled)

    def local_gradients(self, module: EngineModule) -> contextlib.AbstractContextManager:
        """For a loop that runs backward itself, maybe several times per step on parts of the model (manual
        optimization): inside, backward passes leave replicated gradients (DDP) local, for
        ``synchronize_gradients`` to average before they are read. Sharding strategies reduce in backward as always."""
        if self.world_size > 1 and isinstance(self.strategy, ReplicatedGradients):
            return self.no_backward_sync(module)
        return contextlib.nullcontext()

    def synchronize_gradients(self, optimizer: Optimizer) -> None:
        """Average the gradients of ``optimizer``'s parameters over the ranks, after backward passes run under
        ``local_gradients`` (one all-reduce per dtype); nothing where gradients were reduced in backward."""
        if self.world_size == 1 or not isinstance(self.strategy, ReplicatedGradients):
            return
        raw = optimizer.optimizer if isinstance(optimizer, EngineOptimizer) else optimizer
        grads = [p.grad for p in optimizer_parameters([raw]) if p.grad is not None]
        for dtype in sorted({g.dtype for g in grads}, key=str):
            same = [g for g in grads if g.dtype == dtype]
            flat = self.strategy.all_reduce(torch.cat([g.reshape(-1) for g in same]), "mean")
            for grad, value in zip(same, flat.split([g.numel() for g in same])):
                grad.copy_(value.view_as(grad))

    def forward_backward(
        self,
        module: EngineModule,
        compute_loss: LossFunction,
        *,
        synchronize: bool = True,
        batch: Any = None,
        run_backward: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """One micro-batch as the strategy runs it: ``compute_loss()`` (the forward: loss and outputs), backward of
        the loss divided by ``accumulate_grad_batches``, gradients synchronised only when ``synchronize``; returns
        the undivided loss, detached, and the outputs. Pipeline parallelism runs ``batch`` through its schedule.
        ``run_backward(loss)`` runs the backward in place of ``loss.backward()`` (given the divided, scaled loss)
        where ``supports_custom_backward``."""
        # Passed only when given: a strategy of another package may not take it.
        own = {} if run_backward is None else {"run_backward": run_backward}
        return self.strategy.forward_backward(
            module._forward_module, compute_loss, synchronize=synchronize, batch=batch, **own
        )

    def backward(
        self,
        loss: torch.Tensor,
        model: EngineModule | None = None,
        run_backward: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Backward of ``loss`` as the strategy runs it (loss scaling, DeepSpeed's engine); ``run_backward`` as in
        ``forward_backward``."""
        forward_module = model._forward_module if model is not None else None
        if run_backward is None:
            self.strategy.backward(loss, forward_module)
        else:
            self.strategy.backward(loss, forward_module, run_backward=run_backward)

    @property
    def splits_evaluation(self) -> bool:
        """Whether ``validation_step``/``test_step`` run on this rank's parts of each sequence (context parallelism
        without pipeline stages): combine what they compute with ``combine_sequence_parts``."""
        return self.strategy.splits_evaluation

    def combine_sequence_parts(self, values: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """``values`` computed on this rank's parts of the sequences (a split evaluation step), combined over the
        ranks holding the other parts: ``"mean"`` (of equal parts: the whole sequences' mean), ``"sum"``, ``"max"``,
        ``"min"``. One collective over the context-parallel group; ``values`` unchanged where nothing is split."""
        return self.strategy.combine_sequence_parts(values, op)

    @property
    def supports_custom_backward(self) -> bool:
        """Whether a loop may run backward its own way (``run_backward``): not where DeepSpeed's engine or a
        pipeline schedule runs it."""
        return self.strategy.supports_custom_backward

    @property
    def supports_inference_mode(self) -> bool:
        """Whether evaluation may run under ``torch.inference_mode``: the strategy allows it, and no gloo process group
        is in use (its collectives refuse inference tensors; Lightning falls back to ``no_grad`` there too)."""
        if not self.strategy.supports_inference_mode:
            return False
        return not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo")

    @property
    def runs_modules_after_teardown(self) -> bool:
        """Whether a set-up module still runs after ``teardown()`` (False under DeepSpeed: ``setup_module`` again)."""
        return self.strategy.runs_modules_after_teardown

    @property
    def runs_batches_itself(self) -> bool:
        """Whether ``forward_backward`` runs ``batch`` through the strategy's schedule and never calls
        ``compute_loss`` (pipeline parallelism)."""
        return self.strategy.runs_batches_itself

    @property
    def can_skip_optimizer_step(self) -> bool:
        """Whether a loop may leave out an optimizer step (False where the strategy's engine owns it: DeepSpeed)."""
        return self.strategy.can_skip_optimizer_step

    def gradient_norm(self, optimizers: Optimizer | Sequence[Optimizer], norm_type: float = 2.0) -> torch.Tensor | None:
        """The norm of the whole gradient the optimizers would apply (unscaled; over every shard and
        rank), as a tensor; None where it is known only after the step (DeepSpeed)."""
        return self.strategy.gradient_norm(self._unscaled_parameters(optimizers), norm_type)

    def clip_gradients(
        self,
        module: EngineModule,
        optimizer: Optimizer | Sequence[Optimizer],
        max_norm: float | None = None,
        clip_val: float | None = None,
        norm_type: float = 2.0,
    ) -> torch.Tensor | None:
        """Clip by the norm of the whole (unsharded) gradient, or by value; returns the norm before clipping."""
        if (max_norm is None) == (clip_val is None):
            raise ConfigError("clip_gradients takes exactly one of max_norm and clip_val")
        parameters = self._unscaled_parameters(optimizer)
        if max_norm is not None:
            return self.strategy.clip_gradients_norm(parameters, max_norm, norm_type)
        self.strategy.clip_gradients_value(parameters, clip_val)  # type: ignore[arg-type]
        return None

    def _unscaled_parameters(self, optimizers: Optimizer | Sequence[Optimizer]) -> list[torch.Tensor]:
        raw = [
            opt.optimizer if isinstance(opt, EngineOptimizer) else opt
            for opt in ([optimizers] if isinstance(optimizers, Optimizer) else optimizers)
        ]
        for opt in raw:
            self.precision.unscale_gradients(opt)
        return optimizer_parameters(raw)

    def step(self, *optimizers: Optimizer) -> None:
        """Step the given optimizers (what ``optimizer.step()`` on a set-up optimizer does)."""
        optimizer_step(self.strategy, *optimizers)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return self.strategy.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.all_gather(tensor)

    def broadcast(self, obj: T, src: int = 0) -> T:
        return self.strategy.broadcast(obj, src)

    def barrier(self) -> None:
        self.strategy.barrier()

    def progress(self, step: int | None, phase: str = "step") -> None:
        """Say where this rank is: its step and what it is doing (``"data"``, ``"step"``, ...). A loop of your
        own that calls it each step gets the Trainer's hang reports (``hang_timeout_seconds``): no sync, two
        assignments. Until the first call, and once every rank has said ``step=None`` (out of the loop), no rank
        is judged for not making progress."""
        heartbeat.progress(step, phase)

    def data_waits(self) -> dict[int, tuple[int, float]] | None:
        """Per rank: how many times it waited for a batch (the ``"data"`` phase of ``progress``) and the seconds in
        all, from the ranks' heartbeats (a store read, no collective; up to a few seconds old); None in a run of
        one process. ``StragglerMonitor`` compares them."""
        return heartbeat.data_waits()

    def report_hangs_to(self, directory: str | os.PathLike | None) -> None:
        """Where the reporting rank (rank 0 on no progress; the rank whose collective timed out) also writes
        ``hang_report.txt`` (besides standard error)."""
        heartbeat.set_report_dir(Path(directory) if directory is not None else None)

    def teardown(self) -> None:
        """Release what the strategy holds for running the set-up modules (DeepSpeed destroys its
        engine); the Trainer calls it when ``fit``/``validate`` ends, a custom loop when done.
        Idempotent until the next ``setup``. Weights and optimizer state stay readable (``save``)."""
        if self._modules_torn_down == len(self._modules):
            return
        self._modules_torn_down = len(self._modules)
        self.wait_for_checkpoint()  # an asynchronous save may still be reading the state
        self.strategy.teardown()

    def explain_failure(self, exception: BaseException) -> RankFailedError | None:
        """If another rank failed before this one's ``exception``, the error naming it (raise it ``from exception``)."""
        return explain_failure(exception, self.global_rank)

    # ------------------------------------------------------------------ checkpoints
    def save(
        self,
        path: str | os.PathLike,
        state: dict[str, Any],
        *,
        asynchronous: bool = False,
        on_commit: OnCommit = None,
        trainable_only: bool = False,
    ) -> Path:
        """Save ``state`` (modules, optimizers, tensors, objects with ``state_dict()``, plain values)
        as a sharded checkpoint directory, committed atomically; every rank must call this. With
        ``asynchronous=True`` it returns once the state is in CPU memory. ``trainable_only``: of each
        module, its trainable parameters only (adapters); loading such a checkpoint fills those and
        leaves the frozen rest as set up. See ``checkpoint.state``."""
        return self._checkpoints.save(
            path, state, asynchronous=asynchronous, on_commit=on_commit, trainable_only=trainable_only
        )

    def wait_for_checkpoint(self) -> Path | None:
        """Block until an asynchronous save in flight is committed; returns its path (or None)."""
        return self._checkpoints.wait()

    def load(self, path: str | os.PathLike, state: dict[str, Any], strict: bool = True) -> dict[str, Any]:
        """Load a checkpoint saved by ``save`` into ``state`` in place, on any number of ranks and under
        any strategy; returns saved plain entries that ``state`` did not name. Every rank must call this."""
        return self._checkpoints.load(path, state, strict=strict)

    def _require_launched(self, what: str) -> None:
        if not self._launched:
            raise RuntimeError(f"call engine.launch() before engine.{what}()")
