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
import os
from pathlib import Path
from datetime import timedelta
from typing import Any, Callable, Literal, Sequence, TypeVar, overload

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from shardtrain.checkpoint import PendingSave, load_sharded, read_meta, save_sharded, save_sharded_async, saved_keys
from shardtrain.data import DeviceDataLoader, move_to_device, with_distributed_sampler
from shardtrain.errors import CheckpointError, ConfigError, RankFailedError
from shardtrain.launch.environment import ClusterEnvironment, detect_environment
from shardtrain.launch.failures import first_failure, publish_failure
from shardtrain.launch.subprocess_launcher import launch_local_processes
from shardtrain.precision import Precision
from shardtrain.rank_agreement import check_same_on_every_rank, module_fingerprint
from shardtrain.seed import restore_rng, rng_tensors, seed_everything
from shardtrain.strategies import Strategy, create_strategy
from shardtrain.strategies.base import TrainingSettings, optimizer_parameters, repoint_optimizer
from shardtrain.wrapper import EngineModule

T = TypeVar("T")
Accelerator = Literal["auto", "cpu", "cuda"]


def resolve_accelerator(accelerator: str) -> str:
    if accelerator not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"unknown accelerator {accelerator!r}; choose 'auto', 'cpu' or 'cuda'")
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError("accelerator='cuda' but no CUDA device is available; use accelerator='cpu' or 'auto'")
    return "cuda" if accelerator == "gpu" else accelerator


class EngineOptimizer:
    """The user's optimizer with ``step()`` routed through the strategy (loss scaling, DeepSpeed).

    It is an instance of the user's optimizer class, sharing its parameter groups and state, so
    LR schedulers can be built on it.
    """

    def __init__(self, optimizer: Optimizer, engine: "Engine") -> None:
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
        self.__class__ = type("Engine" + type(optimizer).__name__, (EngineOptimizer, type(optimizer)), {})
        self._optimizer = optimizer
        self._engine = engine

    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            closure()
        self._engine.step(self._optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        self._engine.strategy.optimizer_zero_grad(self._optimizer, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state_dict)


class Engine:
    """Launch processes, place a model and optimizers with a strategy, and train them.

    Args:
        accelerator: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        devices: processes per node (one per GPU on CUDA); ``"auto"``: what torchrun or SLURM started,
            else every visible GPU on CUDA and one process on the CPU. Under torchrun or SLURM a
            number that differs from the launcher's layout is an error.
        num_nodes: machines in the run (under torchrun or SLURM, it must match theirs).
        strategy: a registered name (``"single"``, ``"ddp"``, ...; see ``available_strategies()``),
            ``"auto"``, or a ``Strategy`` object.
        precision: ``"32-true"``, ``"bf16-mixed"``, ``"bf16-true"`` or ``"16-mixed"`` (see ``shardtrain.precision``).
        timeout_seconds: how long a collective may wait for the other ranks before the run fails.
    """

    def __init__(
        self,
        accelerator: Accelerator | str = "auto",
        devices: int | Literal["auto"] = "auto",
        num_nodes: int = 1,
        strategy: str | Strategy = "auto",
        precision: str | int = "32-true",
        timeout_seconds: float = 1800.0,
    ) -> None:
        if devices != "auto" and (not isinstance(devices, int) or devices < 1):
            raise ConfigError(f"devices must be a whole number >= 1 or 'auto', got {devices!r}")
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ConfigError(f"num_nodes must be a whole number >= 1, got {num_nodes!r}")
        self.accelerator = resolve_accelerator(accelerator)
        visible = torch.cuda.device_count() if self.accelerator == "cuda" else 1
        self._environment = detect_environment(None if devices == "auto" else devices, num_nodes, auto_devices=visible)
        if self.accelerator == "cuda" and self._environment.local_world_size > visible:
            raise ConfigError(
                f"devices={self._environment.local_world_size} but this machine has {visible} CUDA devices"
            )
        world_size = self._environment.world_size
        if strategy == "auto":
            strategy = "ddp" if world_size > 1 else "single"
        self.strategy: Strategy = create_strategy(strategy)
        self.strategy.validate(world_size, self.accelerator)
        self.precision = Precision(precision)
        self.timeout = timedelta(seconds=timeout_seconds)
        self._training = TrainingSettings()
        self._launched = False
        self._modules: list[nn.Module] = []
        self._module_of_optimizer: dict[int, nn.Module] = {}  # where parameters cannot tell (ZeRO flattens them)
        self._pending_save: PendingSave | None = None
        self._modules_torn_down = 0  # how many of self._modules the strategy's teardown has seen

    # ------------------------------------------------------------------ processes
    def launch(self, function: Callable[..., T] | None = None, *args: Any, **kwargs: Any) -> T | None:
        """Start the processes of the run (if not already started) and join the process group.

        With ``function``, call ``function(engine, *args, **kwargs)`` in every process and return its result.
        """
        if not self._launched:
            if not self._environment.processes_started:
                launch_local_processes(self._environment)
                self._environment = detect_environment(self._environment.local_world_size, 1)
            env = self._environment
            device = torch.device("cuda", env.local_rank) if self.accelerator == "cuda" else torch.device("cpu")
            if self.accelerator == "cpu" and env.local_world_size > 1:
                torch.set_num_threads(
                    int(os.environ.get("OMP_NUM_THREADS", max(1, (os.cpu_count() or 1) // env.local_world_size)))
                )
            self.strategy.connect(env, device, self.precision, self.timeout)
            self.precision = self.strategy.precision  # a strategy may implement the precision its own way
            self.strategy.setup_environment()
            self._launched = True
        return function(self, *args, **kwargs) if function is not None else None

    def use_strategy(self, strategy: str | Strategy) -> None:
        """Switch to another strategy before any model is set up (how ``strategy="auto"`` decides late)."""
        if self._modules:
            raise RuntimeError(
                "use_strategy() must come before setup(): a model is already placed by the current strategy"
            )
        chosen = create_strategy(strategy)
        chosen.validate(self.world_size, self.accelerator)
        if self._launched:
            chosen.connect(self._environment, self.strategy.device, self.precision, self.timeout)
            self.precision = chosen.precision
            chosen.setup_environment()
        chosen.configure_training(self._training)
        self.strategy = chosen

    def configure_training(
        self,
        *,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        micro_batch_size: int | None = None,
    ) -> None:
        """Tell the strategy how the loop will train (DeepSpeed writes this into its config).

        Optional for custom loops; raises ``ConfigError`` for settings the strategy cannot honour
        (DeepSpeed and clipping by value), before any process group exists.
        """
        self._training = TrainingSettings(
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            micro_batch_size=micro_batch_size,
        )
        self.strategy.configure_training(self._training)

    @property
    def environment(self) -> ClusterEnvironment:
        return self._environment

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def global_rank(self) -> int:
        return self._environment.global_rank

    rank = global_rank

    @property
    def local_rank(self) -> int:
        return self._environment.local_rank

    @property
    def node_rank(self) -> int:
        return self._environment.node_rank

    @property
    def world_size(self) -> int:
        return self._environment.world_size

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only."""
        if self.is_global_zero:
            print(*args, **kwargs)

    def seed_everything(self, seed: int) -> int:
        return seed_everything(seed)

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

        Optimizers built before set-up are re-pointed at the parameters the strategy put in place.
        """
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
        """Set up ``module`` and the optimizers ``make_optimizers()`` builds, in the order the strategy
        needs: on the sharded parameters after FSDP wraps the model, or before DeepSpeed takes both.
        ``make_optimizers`` is called once, with the module's parameters real (not meta)."""
        from shardtrain.wrapper import ForwardRouter

        self._require_launched("setup")
        self._check_ranks_agree(module)
        self.precision.grad_scaler(self.device.type)
        forward_module, optimizers = self.strategy.setup_module_and_optimizers(ForwardRouter(module), make_optimizers)
        self._modules.append(module)
        self._module_of_optimizer.update({id(optimizer): module for optimizer in optimizers})
        return EngineModule(forward_module, module, self.strategy), [
            EngineOptimizer(optimizer, self) for optimizer in optimizers
        ]

    def setup_module(self, module: nn.Module) -> EngineModule:
        from shardtrain.wrapper import ForwardRouter

        self._require_launched("setup")
        self._check_ranks_agree(module)
        forward_module = self.strategy.setup_module(ForwardRouter(module))
        self._modules.append(module)
        return EngineModule(forward_module, module, self.strategy)

    def _check_ranks_agree(self, module: nn.Module) -> None:
        """One collective at set-up: every rank built the same model with the same settings."""
        settings = {"strategy": self.strategy.name, "precision": self.precision.name, "training": repr(self._training)}
        check_same_on_every_rank(
            "the model or the run's settings",
            {**module_fingerprint(module), **{f"[setting] {key}": value for key, value in settings.items()}},
            "Every rank must build the same model with the same arguments: look for a size or config read differently per rank or node.",
        )

    def setup_optimizers(self, *optimizers: Optimizer) -> list[EngineOptimizer]:
        self._require_launched("setup")
        self.precision.grad_scaler(self.device.type)
        return [EngineOptimizer(self.strategy.setup_optimizer(optimizer), self) for optimizer in optimizers]

    def setup_dataloaders(self, *loaders: DataLoader, use_distributed_sampler: bool = True, seed: int = 0) -> Any:
        """Give each rank its share of the data and move batches to the device."""
        self._require_launched("setup_dataloaders")
        out = [
            DeviceDataLoader(
                with_distributed_sampler(loader, self.world_size, self.global_rank, seed)
                if use_distributed_sampler
                else loader,
                self.device,
            )
            for loader in loaders
        ]
        return out[0] if len(out) == 1 else out

    def to_device(self, obj: T) -> T:
        return move_to_device(obj, self.device)

    # ------------------------------------------------------------------ the step
    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision's compute context, for code that runs outside a set-up module's forward."""
        return self.strategy.forward_context()

    def no_backward_sync(self, module: EngineModule, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation for a micro-batch that only accumulates."""
        return self.strategy.no_backward_sync(module._forward_module, enabled)

    def backward(self, loss: torch.Tensor, model: EngineModule | None = None) -> None:
        self.strategy.backward(loss, model._forward_module if model is not None else None)

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
        optimizers = [optimizer] if isinstance(optimizer, Optimizer) else list(optimizer)
        raw = [opt.optimizer if isinstance(opt, EngineOptimizer) else opt for opt in optimizers]
        for opt in raw:
            self.precision.unscale_gradients(opt)
        parameters = optimizer_parameters(raw)
        if max_norm is not None:
            return self.strategy.clip_gradients_norm(parameters, max_norm, norm_type)
        self.strategy.clip_gradients_value(parameters, clip_val)  # type: ignore[arg-type]
        return None

    def step(self, *optimizers: Optimizer) -> None:
        """Step the given optimizers (what ``optimizer.step()`` on a set-up optimizer does)."""
        for optimizer in optimizers:
            self.strategy.optimizer_step(optimizer.optimizer if isinstance(optimizer, EngineOptimizer) else optimizer)
        self.precision.update()

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return self.strategy.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.strategy.all_gather(tensor)

    def broadcast(self, obj: T, src: int = 0) -> T:
        return self.strategy.broadcast(obj, src)

    def barrier(self) -> None:
        self.strategy.barrier()

    def teardown(self) -> None:
        """Release what the strategy holds for running the set-up modules (DeepSpeed: destroys its engine).

        The Trainer calls it when ``fit``/``validate`` ends, after an exception too; a custom loop
        calls it when done. Idempotent: a second call does nothing until another ``setup``. The
        weights and optimizer state stay readable (``save``, ``module_state_dict``); see
        ``Strategy.teardown`` for what each strategy releases.
        """
        if self._modules_torn_down == len(self._modules):
            return
        self._modules_torn_down = len(self._modules)
        self.wait_for_checkpoint()  # an asynchronous save may still be reading the state
        self.strategy.teardown()

    def explain_failure(self, exception: BaseException) -> RankFailedError | None:
        """Record that this rank fails with ``exception``; if another rank failed first, the
        error that names it and holds its traceback (raise it ``from exception``)."""
        if isinstance(exception, SystemExit):
            return None
        publish_failure(exception)
        root = first_failure()
        if root is None or root.rank == self.global_rank:
            return None
        return RankFailedError(root.rank, root.traceback)

    # ------------------------------------------------------------------ checkpoints
    def save(
        self,
        path: str | os.PathLike,
        state: dict[str, Any],
        *,
        asynchronous: bool = False,
        on_commit: Callable[[Path], None] | None = None,
    ) -> Path:
        """Save ``state`` as a sharded checkpoint directory (see ``shardtrain.checkpoint.sharded``).

        Modules and optimizers: each rank writes its own shards (no gather), keyed by parameter
        names. Tensors: as they are. Objects with ``state_dict()`` (schedulers, callbacks) and
        plain values: as JSON. Every rank's RNG state is saved too. Every rank must call this;
        the directory appears atomically when all have finished, and then ``on_commit(path)``
        runs on rank 0.

        With ``asynchronous=True`` this returns once the state is copied to CPU memory and the
        files are written in the background; at most one save is in flight (a new save, a load
        or ``wait_for_checkpoint()`` waits for it).
        """
        self.wait_for_checkpoint()
        tensors: dict[str, Any] = {}
        plain: dict[str, Any] = {}
        for key, value in state.items():
            self._split(key, value, tensors, plain)
        tensors["rng"] = {f"rank{self.global_rank}": rng_tensors()}
        modules = [key for key, value in state.items() if isinstance(value, nn.Module)]
        meta = {"world_size": self.world_size, "strategy": self.strategy.name, "modules": modules, "state": plain}
        if asynchronous:
            self._pending_save = save_sharded_async(
                path, tensors, meta, rank=self.global_rank, barrier=self.barrier, on_commit=on_commit
            )
            return Path(path)
        return save_sharded(path, tensors, meta, rank=self.global_rank, barrier=self.barrier, on_commit=on_commit)

    def wait_for_checkpoint(self) -> Path | None:
        """Block until an asynchronous save in flight is committed; returns its path (or None)."""
        pending, self._pending_save = self._pending_save, None
        return pending.wait() if pending is not None else None

    def load(self, path: str | os.PathLike, state: dict[str, Any], strict: bool = True) -> dict[str, Any]:
        """Load a checkpoint saved by ``save`` into ``state`` in place, on any number of ranks and
        under any strategy; plain values in ``state`` are replaced. Returns saved plain entries
        that ``state`` did not name. Every rank must call this."""
        self.wait_for_checkpoint()
        meta = read_meta(path)
        saved_plain: dict[str, Any] = meta["state"]
        on_disk = saved_keys(path)
        tensors: dict[str, Any] = {}
        plain_targets: dict[str, Any] = {}
        for key, value in state.items():
            in_tensors = any(k == key or k.startswith(key + ".") for k in on_disk)
            if not in_tensors and key not in saved_plain:
                if strict:
                    raise CheckpointError(
                        f"checkpoint {path} has no entry {key!r}; it holds {sorted(saved_plain) + sorted({k.split('.')[0] for k in on_disk})}"
                    )
                continue
            self._split(key, value, tensors, plain_targets)
        same_layout = meta["world_size"] == self.world_size
        if same_layout:
            tensors["rng"] = {f"rank{self.global_rank}": rng_tensors()}
        modules = tuple(key for key, value in state.items() if isinstance(value, nn.Module) and key in tensors)
        load_sharded(path, tensors, strict_prefixes=modules if strict else ())
        for key, value in state.items():
            if key in tensors:
                self._apply_tensors(value, tensors[key], strict)
            elif key in saved_plain:
                state[key] = self._apply_plain(value, saved_plain[key], f"{path}: {key!r}")
        if same_layout:
            restore_rng(tensors["rng"][f"rank{self.global_rank}"])
        return {key: value for key, value in saved_plain.items() if key not in state}

    def _split(self, key: str, value: Any, tensors: dict[str, Any], plain: dict[str, Any]) -> None:
        """Put ``value``'s state under ``key`` in ``tensors`` (sharded) or ``plain`` (JSON)."""
        if isinstance(value, nn.Module):
            tensors[key] = self.strategy.module_state_dict(
                value.module if isinstance(value, EngineModule) else value, full=False
            )
        elif isinstance(value, Optimizer):
            raw = value.optimizer if isinstance(value, EngineOptimizer) else value
            tensors[key] = self.strategy.optimizer_state_dict(self._module_of(raw), raw, full=False)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(item, Optimizer) for item in value):
            nested: dict[str, Any] = {}
            for index, item in enumerate(value):
                self._split(str(index), item, nested, {})
            tensors[key] = nested
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, (list, tuple)) and any(callable(getattr(item, "state_dict", None)) for item in value):
            plain[key] = [item.state_dict() for item in value]
        elif callable(getattr(value, "state_dict", None)):
            plain[key] = value.state_dict()
        else:
            plain[key] = value

    def _apply_tensors(self, target: Any, loaded: Any, strict: bool) -> None:
        if isinstance(target, nn.Module):
            self.strategy.load_module_state_dict(
                target.module if isinstance(target, EngineModule) else target, loaded, strict=strict, full=False
            )
        elif isinstance(target, Optimizer):
            raw = target.optimizer if isinstance(target, EngineOptimizer) else target
            self.strategy.load_optimizer_state_dict(self._module_of(raw), raw, loaded, full=False)
        elif isinstance(target, (list, tuple)):
            for index, item in enumerate(target):
                self._apply_tensors(item, loaded[str(index)], strict)
        # plain tensors were filled in place by DCP

    @staticmethod
    def _apply_plain(target: Any, saved: Any, where: str) -> Any:
        if isinstance(target, (list, tuple)) and any(
            callable(getattr(item, "load_state_dict", None)) for item in target
        ):
            if len(target) != len(saved):
                raise CheckpointError(
                    f"{where} holds {len(saved)} states but {len(target)} objects were given to load them into"
                )
            for item, item_state in zip(target, saved):
                item.load_state_dict(item_state)
            return target
        if callable(getattr(target, "load_state_dict", None)):
            target.load_state_dict(saved)
            return target
        return saved

    def _module_of(self, optimizer: Optimizer) -> nn.Module:
        """The set-up module whose parameters ``optimizer`` updates."""
        if id(optimizer) in self._module_of_optimizer:
            return self._module_of_optimizer[id(optimizer)]
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for module in self._modules:
            if any(id(p) in params for p in module.parameters()):
                return module
        raise CheckpointError(
            "the optimizer's parameters belong to no module set up with this engine; call engine.setup(model, optimizer) first"
        )

    def _require_launched(self, what: str) -> None:
        if not self._launched:
            raise RuntimeError(f"call engine.launch() before engine.{what}()")
