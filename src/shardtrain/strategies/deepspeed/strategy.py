"""DeepSpeed ZeRO (stages 0-3) with CPU and disk (NVMe) offload, through ``deepspeed.initialize``.

DeepSpeed is an optional extra (``pip install 'shardtrain[deepspeed]'``). The apply step, in
order: delayed initialisation (ZeRO-3: each block is initialised and partitioned in turn, so the
whole model never exists on one rank), activation checkpointing from a policy, the optimizer
from ``configure_optimizers()`` (DeepSpeed's CPU Adam in its place when the optimizer state is
offloaded), then ``deepspeed.initialize``. Its config comes from ``config``, its
run-time pieces from ``runtime``; checkpoints use the common format (``state``).
``no_backward_sync`` marks DeepSpeed's accumulation boundary; ``backward`` is DeepSpeed's (given a
loss already divided by the accumulation steps, as for any strategy); its optimizer step also
clips by norm, so the norm is known only after it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from shardtrain.errors import ConfigError, MissingDependencyError, StrategyError
from shardtrain.memory import ModelFootprint, StrategyMemory
from shardtrain.precision import Precision
from shardtrain.strategies.deepspeed import state as state_io
from shardtrain.parallel.activation_checkpoint import apply_activation_checkpointing
from shardtrain.parallel.dims import ParallelDims
from shardtrain.strategies.base import Strategy, TrainingSettings, repoint_optimizer
from shardtrain.strategies.capabilities import BackwardSyncControl
from shardtrain.strategies.deepspeed.config import (
    DeepSpeedOptions,
    build_config,
    evaluation_config,
    offload_nvme_paths,
)
from shardtrain.strategies.deepspeed.memory import deepspeed_memory
from shardtrain.strategies.deepspeed.runtime import (
    DeepSpeedPrecision,
    accumulation_boundary,
    describe_offload,
    materialize_partitioned,
    optimizer_for_deepspeed,
    require_async_io,
)
from shardtrain.parallel.materialize import has_meta_tensors
from shardtrain.parallel.policy import ModulePolicy
from shardtrain.strategies.registry import register_strategy

log = logging.getLogger(__name__)


class DeepSpeedStrategy(BackwardSyncControl, Strategy):
    """Partition optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) with DeepSpeed.

    Args:
        stage: ZeRO stage 0-3 (default 2; the file's value if ``config`` sets one).
        offload_optimizer: keep the optimizer state (and its step) in CPU memory or on disk.
        offload_parameters: keep parameters in CPU memory or on disk between uses (stage 3).
        offload_optimizer_device: ``"cpu"`` (default) or ``"nvme"`` (stage 3).
        offload_params_device: ``"cpu"`` (default) or ``"nvme"``.
        nvme_path: directory on a fast local disk for the swap files of ``"nvme"`` offload.
        pin_memory: page-lock offloaded CPU buffers (default: on CUDA only).
        allgather_bucket_size: elements per parameter all-gather bucket.
        reduce_bucket_size: elements per gradient reduce bucket.
        overlap_comm: overlap gradient reduction with the backward pass.
        activation_checkpointing_policy: which modules recompute their activations in backward
            (module classes, class names or a callable), with no change to the model.
        delayed_init: ZeRO-3 only: build ``configure_model()`` on the meta device and initialise
            and partition one block at a time (default True).
        config: everything else: a DeepSpeed config dict, or a path to a DeepSpeed JSON file.
            Named options given here win over the file's keys (with a warning naming them); the
            Trainer's precision, batch size, accumulation and clipping win over both.
    """

    name = "deepspeed"
    needs_process_group = True
    #: Its optimizer step also clips and reduces; the norm is known only after it.
    can_skip_optimizer_step = False
    runs_modules_after_teardown = False  # teardown destroys the engine; evaluation after fit sets up a new one

    def __init__(
        self,
        *,
        stage: int | None = None,
        offload_optimizer: bool | None = None,
        offload_parameters: bool | None = None,
        offload_optimizer_device: str | None = None,
        offload_params_device: str | None = None,
        nvme_path: str | None = None,
        pin_memory: bool | None = None,
        allgather_bucket_size: int | None = None,
        reduce_bucket_size: int | None = None,
        overlap_comm: bool | None = None,
        activation_checkpointing_policy: ModulePolicy | None = None,
        delayed_init: bool = True,
        config: dict[str, Any] | str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if importlib.util.find_spec("deepspeed") is None:
            raise MissingDependencyError("deepspeed", "strategy='deepspeed'", extra="deepspeed")
        self.options = DeepSpeedOptions(
            stage=stage,
            offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters,
            offload_optimizer_device=offload_optimizer_device,
            offload_params_device=offload_params_device,
            nvme_path=nvme_path,
            pin_memory=pin_memory,
            allgather_bucket_size=allgather_bucket_size,
            reduce_bucket_size=reduce_bucket_size,
            overlap_comm=overlap_comm,
        )
        self.user_config = config
        self.activation_checkpointing_policy = activation_checkpointing_policy
        self.delayed_init = delayed_init
        self._device_type = "cpu"
        self._config: dict[str, Any] | None = None
        self._config_inputs: tuple[Any, ...] = ()
        self.config  # every check runs now, before any process starts
        self._engine: Any = None
        self._user_optimizer: Optimizer | None = None
        self._group_names: list[list[str]] = []
        self._pending_norm: torch.Tensor | None = None
        self._destroyed = False  # teardown() destroyed self._engine; its state is still readable
        # The engine whose optimizer holds the training state: self._engine, or after an evaluation set up after
        # training (a new engine without an optimizer), the destroyed training engine.
        self._state_engine: Any = None

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """The DeepSpeed config: the options, the user's config and the run's settings, assembled by
        ``config.build_config`` when first read after a setting changed."""
        inputs = (self.precision.name, repr(self.training), self.world_size, self._device_type)
        if self._config is None or self._config_inputs != inputs:
            self._config, self._config_inputs = self._build_config(), inputs
        return self._config

    def _build_config(self) -> dict[str, Any]:
        return build_config(
            self.options,
            self.user_config,
            self.training,
            precision=self.precision.name,
            world_size=self.world_size,
            device_type=self._device_type,
        )

    @property
    def stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])

    def validate(self, world_size: int, device_type: str) -> None:
        self._device_type = device_type
        if offload_nvme_paths(self.config):
            require_async_io(device_type)

    def make_parallel_dims(self, world_size: int, local_world_size: int) -> ParallelDims:
        """ZeRO partitions over every rank: all of them are data-parallel shard ranks."""
        return ParallelDims(world_size=world_size, dp_shard=world_size)

    def make_precision(self, name: str | int) -> Precision:
        return DeepSpeedPrecision(name)

    def configure_training(self, settings: TrainingSettings) -> None:
        if settings.gradient_clip_val is not None and settings.gradient_clip_algorithm == "value":
            raise ConfigError(
                "DeepSpeed clips gradients by norm only; use gradient_clip_algorithm='norm' "
                "(or another strategy, such as 'fsdp', to clip by value)"
            )
        super().configure_training(settings)

    def connect(self, environment: Any, device: torch.device, timeout: Any, *args: Any, **kwargs: Any) -> None:
        super().connect(environment, device, timeout, *args, **kwargs)
        self._device_type = device.type

    def setup_environment(self) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device.type == "cuda" else "cpu")
        assert self.environment is not None
        # DeepSpeed reads the rank layout from the environment (zero.Init needs LOCAL_RANK), which
        # a single process started without a launcher does not have.
        os.environ.setdefault("LOCAL_RANK", str(self.environment.local_rank))
        os.environ.setdefault("RANK", str(self.environment.global_rank))
        os.environ.setdefault("WORLD_SIZE", str(self.environment.world_size))
        super().setup_environment()
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, timeout=self.timeout)
        for path in offload_nvme_paths(self.config):
            os.makedirs(path, exist_ok=True)

    # ------------------------------------------------------------------ model and optimizer
    def module_init_context(self) -> contextlib.AbstractContextManager:
        if self.stage == 3 and self.delayed_init:
            return torch.device("meta")
        stack = contextlib.ExitStack()
        stack.enter_context(self.device)
        return stack

    def setup_module(self, module: nn.Module) -> nn.Module:
        engine, _ = self.setup_module_and_optimizers(module, lambda: [])
        return engine

    def _check_one_dtype(self, module: nn.Module) -> None:
        """ZeRO-3 in fp32 with weights of several dtypes (a LoRA base kept in bf16 by ``frozen_dtype``) trained the
        adapters differently from one process (1e-3 after 4 steps, against 1e-6 in one dtype): refused, naming the
        two ways that work. In 16 bits DeepSpeed casts the whole model to that dtype itself."""
        if self.stage != 3 or any(self.config.get(key, {}).get("enabled") for key in ("bf16", "fp16")):
            return
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.is_floating_point()})
        if len(dtypes) > 1:
            raise ConfigError(
                f"DeepSpeed ZeRO-3 in fp32 is given parameters of several dtypes ({', '.join(dtypes)}, e.g. a base kept "
                "in bf16 by frozen_dtype); use precision='bf16-mixed' (DeepSpeed keeps the whole model in bf16 and fp32 "
                "master copies of what trains), or strategy='fsdp', which trains such a model as one process does"
            )

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        raise StrategyError(
            "DeepSpeed sets up a model and its optimizer together: call engine.setup(model, optimizer) "
            "or engine.setup_module_and_optimizers(model, make_optimizers), not setup_optimizers() after setup_module()"
        )

    def setup_module_and_optimizers(
        self, module: nn.Module, make_optimizers: Callable[[], Sequence[Optimizer]]
    ) -> tuple[nn.Module, list[Optimizer]]:
        import deepspeed

        self._check_one_dtype(module)
        # The optimizer is built first, on the parameters as the model defines them (whole shapes,
        # still on the meta device under delayed init): code such as ``p.dim() >= 2`` to choose
        # weight decay must not see ZeRO-3's empty partitions. It is pointed at the real ones after.
        names = {id(p): name for name, p in module.named_parameters()}
        optimizers = list(make_optimizers())
        if has_meta_tensors(module):
            materialize_partitioned(module, self.device, self.config)
            for optimizer in optimizers:
                repoint_optimizer(optimizer, names, dict(module.named_parameters()))
        if self.activation_checkpointing_policy is not None:
            apply_activation_checkpointing(module, self.activation_checkpointing_policy)
        if len(optimizers) > 1:
            raise StrategyError(
                f"DeepSpeed trains one optimizer, but configure_optimizers() returned {len(optimizers)}; "
                "put all parameters in one optimizer (use parameter groups for different settings), or use strategy='fsdp'"
            )
        user_optimizer = optimizers[0] if optimizers else None
        if user_optimizer is not None and "optimizer" in self.config:
            raise ConfigError(
                "the DeepSpeed config has an 'optimizer' section and configure_optimizers() returned an optimizer too; keep one"
            )
        names = {id(p): name for name, p in module.named_parameters()}
        group_names = (
            [[names[id(p)].removeprefix("module.") for p in group["params"]] for group in user_optimizer.param_groups]
            if user_optimizer
            else []
        )
        self.teardown()  # set up again: the previous engine's hooks must not stay on the model
        evaluation = user_optimizer is None and "optimizer" not in self.config
        engine, zero_optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer_for_deepspeed(user_optimizer, self.config),
            config=evaluation_config(self.config) if evaluation else self.config,
            dist_init_required=False,
        )
        self._engine, self._destroyed = engine, False
        if user_optimizer is None and engine.optimizer is not None and "optimizer" in self.config:  # DeepSpeed's own
            user_optimizer = state_io.base_optimizer(engine.optimizer)
            group_names = [list(names.values())]
            optimizers = [user_optimizer]
        if user_optimizer is not None or self._state_engine is None:
            self._user_optimizer, self._group_names, self._state_engine = user_optimizer, group_names, engine
        # else: set up for evaluation after training (no optimizer): the trained engine's optimizer keeps the state
        if engine.optimizer is not None and optimizers:
            state_io.initialise_optimizer_state(engine.optimizer)
        log.info("DeepSpeed ZeRO stage %d, %s", self.stage, describe_offload(self.config))
        return engine, optimizers

    def forward_context(self) -> contextlib.AbstractContextManager:
        if self._destroyed:
            raise StrategyError(
                "the DeepSpeed engine was destroyed when fit() ended (teardown), so its model can be saved, read and "
                "evaluated (trainer.validate/test/predict set it up again) but not trained; to train again, use a "
                "new Trainer (resume with ckpt_path)"
            )
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the step
    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        return accumulation_boundary(self._engine, is_boundary=not enabled)

    def backward(
        self,
        loss: torch.Tensor,
        module: nn.Module | None = None,
        run_backward: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if run_backward is not None:
            raise ConfigError(
                "a backward of the module's own (Lightning's backward hook, or manual_backward's arguments) cannot run "
                "under deepspeed: DeepSpeed's engine runs backward itself (Lightning ignores the hook there); remove "
                "it, or use strategy='fsdp'"
            )
        self._require_engine("backward")
        self._engine.backward(loss, scale_wrt_gas=False)  # the loss given is already divided (see forward_backward)

    def optimizer_step(self, optimizer: Optimizer) -> None:
        self._require_engine("step")
        self._engine.step()
        if self._pending_norm is not None:
            norm = self._engine.get_global_grad_norm()
            if norm is not None:
                self._pending_norm.fill_(norm.detach().reshape(()) if isinstance(norm, torch.Tensor) else float(norm))
            self._pending_norm = None

    @property
    def supports_custom_backward(self) -> bool:
        return False

    def optimizer_zero_grad(self, optimizer: Optimizer, set_to_none: bool = True) -> None:
        """DeepSpeed's step clears the gradients; ZeRO owns the gradient buffers, so nothing else may."""

    def gradient_norm(self, parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor | None:
        """Not known before the step: DeepSpeed reduces and measures the gradients inside it."""
        return None

    def clip_gradients_norm(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        """DeepSpeed clips inside its optimizer step; the returned tensor holds the norm once that step ran."""
        self._require_engine("clip_gradients")
        if norm_type != 2.0:
            raise ConfigError(f"DeepSpeed clips by the 2-norm only, got norm_type={norm_type}")
        self._engine._config.gradient_clipping = float(max_norm)
        if hasattr(self._engine.optimizer, "clip_grad"):
            self._engine.optimizer.clip_grad = float(max_norm)
        self._pending_norm = torch.full((), float("nan"), device=self.device)
        return self._pending_norm

    def clip_gradients_value(self, parameters: Iterable[torch.Tensor], clip_value: float) -> None:
        raise ConfigError("DeepSpeed clips gradients by norm only; use max_norm / gradient_clip_algorithm='norm'")

    # ------------------------------------------------------------------ state, in the common format
    def module_state_dict(self, module: nn.Module, full: bool = True) -> dict[str, Any]:
        return state_io.model_state(module, owned_only=not full)

    def load_module_state_dict(
        self, module: nn.Module, state: dict[str, Any], strict: bool = True, full: bool = True
    ) -> None:
        if full:  # every rank was given everything: keep what this rank owns (and broadcasts)
            state = state_io.keep_owned([name for name, _ in state_io.named_state_tensors(module)], state)
        state_io.load_model_state(module, state, self.device, self._zero_optimizer())

    def optimizer_state_dict(self, module: nn.Module, optimizer: Optimizer, full: bool = True) -> dict[str, Any]:
        self._require_engine("optimizer_state_dict")
        return state_io.optimizer_state(
            module, self._zero_optimizer(), optimizer, self._group_names, owned_only=not full
        )

    def load_optimizer_state_dict(
        self, module: nn.Module, optimizer: Optimizer, state: dict[str, Any], full: bool = True
    ) -> None:
        self._require_engine("load_optimizer_state_dict")
        if full:
            state = {
                **state,
                "state": state_io.keep_owned([name for name, _ in state_io._trainable(module)], state.get("state", {})),
            }
        state_io.load_optimizer_state(module, self._zero_optimizer(), optimizer, state, self.device)
        state_io.refresh_low_precision_params(self._zero_optimizer(), module)

    def _zero_optimizer(self) -> Any:
        """The ZeRO optimizer that holds the fp32 master weights and the optimizer state, and to which the parameters
        are linked: the training engine's, also after an evaluation set up a new engine; None where there is none
        (ZeRO-3 set up without an optimizer has only DeepSpeed's parameter offload, no master weights)."""
        optimizer = self._state_engine.optimizer if self._state_engine is not None else None
        return None if type(optimizer).__name__ == "DeepSpeedZeRoOffload" else optimizer

    def _require_engine(self, what: str) -> None:
        if self._engine is None:
            raise RuntimeError(
                f"{what}() under DeepSpeed needs the model set up first (engine.setup(model, optimizer))"
            )

    def teardown(self) -> None:
        """Destroy the DeepSpeed engine (its ZeRO hooks, pinned buffers, registrations); idempotent.
        The state stays readable (``save_checkpoint()`` after ``fit()``): ZeRO-1/2's ``destroy()``
        unlinks parameters from their fp32 partitions (weights then read wrong by up to 0.49), so
        the links are made again. The model cannot run any more (``forward_context`` says so)."""
        if self._engine is None or self._destroyed:
            return
        self._engine.destroy()
        self._destroyed = True
        zero_optimizer = self._engine.optimizer
        if self.stage in (1, 2) and hasattr(zero_optimizer, "_link_all_hp_params"):  # private, as of deepspeed 0.19
            zero_optimizer._link_all_hp_params()
            if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # and the optimizer state's links
                zero_optimizer._hp_optimizer_states_linked = False
                zero_optimizer._lazy_init_hp_params_optimizer_state()

    def estimate_memory(self, footprint: ModelFootprint) -> StrategyMemory | None:
        """Where ZeRO keeps the bytes at this config's stage and offload devices (``deepspeed_memory``)."""
        return deepspeed_memory(footprint, self.config, name=self.name)

    def __repr__(self) -> str:
        given = {k: getattr(self.options, k) for k in self.options.__slots__ if getattr(self.options, k) is not None}
        return f"DeepSpeedStrategy({', '.join(f'{k}={v!r}' for k, v in given.items())})"


_OFFLOAD_CPU = {"offload_optimizer": True, "offload_parameters": True}
_OFFLOAD_NVME = {**_OFFLOAD_CPU, "offload_optimizer_device": "nvme", "offload_params_device": "nvme"}
for _name, _description, _options in (
    ("deepspeed", "DeepSpeed ZeRO (stage 2 unless set): optimizer state, gradients and parameters partitioned", {}),
    ("deepspeed_stage_1", "DeepSpeed ZeRO-1: optimizer state partitioned", {"stage": 1}),
    ("deepspeed_stage_2", "DeepSpeed ZeRO-2: optimizer state and gradients partitioned", {"stage": 2}),
    (
        "deepspeed_stage_2_offload",
        "DeepSpeed ZeRO-2, optimizer state in CPU memory",
        {"stage": 2, "offload_optimizer": True},
    ),
    ("deepspeed_stage_3", "DeepSpeed ZeRO-3: parameters partitioned too", {"stage": 3}),
    (
        "deepspeed_stage_3_offload",
        "DeepSpeed ZeRO-3, parameters and optimizer state in CPU memory",
        {"stage": 3, **_OFFLOAD_CPU},
    ),
    (
        "deepspeed_stage_3_offload_nvme",
        "DeepSpeed ZeRO-3, parameters and optimizer state on disk (needs nvme_path)",
        {"stage": 3, **_OFFLOAD_NVME},
    ),
):
    register_strategy(_name, DeepSpeedStrategy, _description, **_options)
