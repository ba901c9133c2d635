"""Tensor parallelism, alone or composed with FSDP2 (2-D parallelism), on one named device mesh.

The run's ranks form a ``(dp_shard, tp)`` mesh, tensor parallel innermost so that a tensor-
parallel group is neighbouring ranks (one node). Within a group, the layers a plan names are
split with PyTorch's DTensor tensor parallelism (``parallelize_module``; see ``parallel.tensor_parallel.plan``); over
the data-parallel dimension, FSDP2 (``fully_shard``) shards what the group holds. Every rank of a
tensor-parallel group reads the same batch. The order follows torchtitan: tensor parallel,
activation checkpointing, FSDP per block then the root, then delayed initialisation.

The argument names are Lightning's ``ModelParallelStrategy``'s, so its strategy line ports.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from shardtrain.errors import ConfigError, StrategyError
from shardtrain.memory import ModelFootprint, StrategyMemory
from shardtrain.parallel.dims import ParallelDims
from shardtrain.parallel.activation_checkpoint import apply_activation_checkpointing
from shardtrain.parallel.compile import apply_compile, compile_options
from shardtrain.parallel.fsdp import apply_fsdp, mixed_precision_policy, no_backward_sync, shard_nested_unit
from shardtrain.strategies.base import Strategy, TrainingSettings
from shardtrain.strategies.capabilities import BackwardSyncControl, DistributedCheckpointState, ShardedGradients
from shardtrain.strategies.fsdp import fsdp_memory
from shardtrain.parallel.materialize import build_on_meta, fresh_copy, has_meta_tensors, materialize, meta_init_context
from shardtrain.parallel.pipeline.schedule import Pipeline
from shardtrain.parallel.pipeline.options import PipelineOptions
from shardtrain.parallel.pipeline.stages import PipelineRouter
from shardtrain.parallel.policy import ModulePolicy, describe, units_of
from shardtrain.parallel.expert_parallel import apply_expert_parallel, check_expert_parallel
from shardtrain.parallel.context_parallel import check_contract, in_split_step, sequence_inputs, split_sequences
from shardtrain.strategies.registry import register_strategy
from shardtrain.parallel.tensor_parallel.plan import (
    FoundPlan,
    Plan,
    apply_plan,
    check_head_counts,
    check_plan,
    find_plan,
    is_tensor_parallel,
    plan_targets,
    with_split_logits,
)

log = logging.getLogger(__name__)

Size = int | Literal["auto"]


_NO_CUSTOM_BACKWARD = (
    "a backward of the module's own (Lightning's backward hook, or manual_backward's arguments) cannot run under "
    "pipeline stages: the schedule runs each micro-batch's backward itself; remove it (on_before_backward/"
    "on_after_backward run around the step's backward)"
)


class ModelParallelStrategy(ShardedGradients, DistributedCheckpointState, BackwardSyncControl, Strategy):
    """Tensor parallelism within groups of ranks, FSDP2 across them; pipeline stages; context parallelism.

    Args:
        data_parallel_size: how many groups read different batches (FSDP shards over them); ``"auto"``:
            what ``tensor_parallel_size`` leaves of the run's ranks.
        tensor_parallel_size: ranks that split each layer between them; ``"auto"``: the processes of one
            node when ``data_parallel_size`` is ``"auto"`` too (Lightning's default), else what
            ``data_parallel_size`` leaves. Head counts must divide by it.
        tp_plan: module-name patterns (``*`` for one part of a name) to style names (``"colwise"``,
            ``"rowwise"``, ...; see ``shardtrain.parallel.tensor_parallel.plan``) or ``ParallelStyle`` objects,
            relative to the ``TrainModule``. Default: the model's own plan (a Hugging Face model's
            ``base_model_tp_plan``, or a ``tp_plan`` attribute). Not used when ``configure_model()``
            parallelises the model itself from ``self.device_mesh``.
        auto_wrap_policy: which modules become FSDP units (as ``FSDPStrategy``'s); default the blocks of
            the largest ``nn.ModuleList``.
        activation_checkpointing_policy: which modules recompute their activations in backward.
        cpu_offload: keep FSDP's shards, gradients and optimizer state in CPU memory.
        mixed_precision: a ``MixedPrecisionPolicy`` that overrides the one derived from ``precision``.
        delayed_init: build ``configure_model()`` on the meta device and materialise each rank's part
            (default True); the seeded weights equal one process's.
        compile: ``torch.compile`` each block after parallelising it; ``True`` or a dict of options
            (under tensor parallelism ``dynamic`` defaults to False: each new input shape compiles again).
        loss_parallel: leave the output layer's logits split by vocabulary (a DTensor sharded on the
            last dimension) and compute ``F.cross_entropy`` from the shards (PyTorch's
            ``loss_parallel``), so no rank holds whole logits. The plan's output layer must be its
            one ``colwise_rep`` entry; steps must pass the logits straight to ``F.cross_entropy``.
        sequence_parallel: use the model's sequence-parallel plan (its ``sequence_parallel_tp_plan``
            attribute): norms and the residual stream between the split layers stay split along the
            sequence, so each rank keeps ``1 / tensor_parallel_size`` of those activations. With
            your own ``tp_plan``, write the sequence-parallel styles into it instead.
        pipeline_parallel_size: stages the model's blocks are divided into, one group of ranks each
            (``torch.distributed.pipelining``); the module defines ``pipeline_inputs`` and ``pipeline_loss``.
        pipeline_schedule: PyTorch's schedule by name: ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"`` (two
            stages per rank unless the split points say otherwise), ``"looped_bfs"``,
            ``"interleaved_zero_bubble"``, ``"zbv_zero_bubble"``, ``"dual_pipe_v"``.
        microbatches: micro-batches each batch is split into (default ``pipeline_parallel_size``); more
            shrink the pipeline's bubble, fewer keep each micro-batch large.
        context_parallel_size: ranks that split each sequence between them (``shardtrain.parallel.context_parallel``:
            PyTorch's ring attention); FSDP shards over data x context ranks. The module defines
            ``context_parallel_inputs(batch)``. Composes with data, tensor and pipeline parallelism (the mesh's
            ``cp`` dimension sits between ``dp_shard`` and ``tp``).
        pipeline_split_points: names of the blocks where stages begin (``["model.blocks.4"]``); default: equal
            runs of the blocks of the model's largest ``nn.ModuleList``.
        expert_parallel_size: ranks among which each mixture-of-experts layer's experts are divided, tokens
            travelling to their experts by all-to-all (``shardtrain.parallel.expert_parallel``: the layer is
            transformers' MoE experts interface, as in Mixtral and the GPT example's ``n_experts``). It divides
            the data-parallel ranks (it borrows from them, as torchtitan's does); FSDP shards the experts over the
            ranks it leaves. Composes with tensor parallelism (the experts are not split by it); not yet with
            context or pipeline parallelism.
    """

    name = "model_parallel"
    needs_process_group = True

    def __init__(
        self,
        *,
        data_parallel_size: Size = "auto",
        tensor_parallel_size: Size = "auto",
        tp_plan: Plan | None = None,
        auto_wrap_policy: ModulePolicy | None = None,
        activation_checkpointing_policy: ModulePolicy | None = None,
        cpu_offload: bool = False,
        mixed_precision: MixedPrecisionPolicy | None = None,
        delayed_init: bool = True,
        compile: bool | dict[str, Any] = False,
        loss_parallel: bool = False,
        sequence_parallel: bool = False,
        pipeline_parallel_size: int = 1,
        pipeline_schedule: str = "1f1b",
        microbatches: int | None = None,
        pipeline_split_points: list[str] | None = None,
        context_parallel_size: int = 1,
        expert_parallel_size: int = 1,
    ) -> None:
        super().__init__()
        if (
            not isinstance(expert_parallel_size, int)
            or isinstance(expert_parallel_size, bool)
            or expert_parallel_size < 1
        ):
            raise StrategyError(f"expert_parallel_size must be a whole number >= 1, got {expert_parallel_size!r}")
        if expert_parallel_size > 1 and (pipeline_parallel_size > 1 or context_parallel_size > 1):
            raise StrategyError(
                f"expert_parallel_size={expert_parallel_size} with "
                + ("pipeline_parallel_size > 1" if pipeline_parallel_size > 1 else "context_parallel_size > 1")
                + " is not supported yet: use expert parallelism with data and tensor parallelism, or leave "
                "expert_parallel_size at 1 (the experts are then FSDP-sharded like every other parameter)"
            )
        self.expert_parallel_size = expert_parallel_size
        if (
            not isinstance(context_parallel_size, int)
            or isinstance(context_parallel_size, bool)
            or context_parallel_size < 1
        ):
            raise StrategyError(f"context_parallel_size must be a whole number >= 1, got {context_parallel_size!r}")
        self.context_parallel_size = context_parallel_size
        for name, value in (("data_parallel_size", data_parallel_size), ("tensor_parallel_size", tensor_parallel_size)):
            if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise StrategyError(f"{name} must be a whole number >= 1 or 'auto', got {value!r}")
        if not isinstance(compile, (bool, dict)):
            raise StrategyError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
        self.data_parallel_size = data_parallel_size
        self.tensor_parallel_size = tensor_parallel_size
        self.tp_plan = check_plan(tp_plan) if tp_plan is not None else None
        self.auto_wrap_policy = auto_wrap_policy
        self.activation_checkpointing_policy = activation_checkpointing_policy
        self.cpu_offload = cpu_offload
        self.mixed_precision = mixed_precision
        self.delayed_init = delayed_init
        self.compile = compile
        if sequence_parallel and tp_plan is not None:
            raise StrategyError(
                "sequence_parallel=True reads the model's own sequence-parallel plan (sequence_parallel_tp_plan); "
                "with your own tp_plan, write the sequence-parallel styles into it (split_sequence, "
                "sequence_parallel, gather_sequence, rowwise_sequence, colwise_rep_sequence) and leave "
                "sequence_parallel off"
            )
        self.loss_parallel = loss_parallel
        self.sequence_parallel = sequence_parallel
        self.pipeline = PipelineOptions(
            size=pipeline_parallel_size,
            schedule=pipeline_schedule,
            microbatches=microbatches,
            split_points=pipeline_split_points,
        )
        self._fsdp_root: FSDPModule | None = None
        self._pipeline: Pipeline | None = None
        self._experts: list[nn.Module] = []
        self._expert_mesh: Any = None

    # ------------------------------------------------------------------ layout
    def make_parallel_dims(self, world_size: int, local_world_size: int) -> ParallelDims:
        """``(pp, dp_shard, tp)`` from the sizes, ``"auto"`` resolved as the constructor says."""
        return model_parallel_dims(
            world_size,
            local_world_size,
            dp=self.data_parallel_size,
            tp=self.tensor_parallel_size,
            pp=self.pipeline.size,
            cpu_offload=self.cpu_offload,
            cp=self.context_parallel_size,
            ep=self.expert_parallel_size,
        )

    def configure_training(self, settings: TrainingSettings) -> None:
        """Under pipeline parallelism, the loader's batch size must divide into the micro-batches. Manual
        optimization is refused (backward inside the step, under a pipeline schedule or a 2-D mesh: not built yet)."""
        if settings.manual_optimization:
            raise ConfigError(
                "manual optimization (automatic_optimization = False) is not supported by strategy='model_parallel' "
                "yet: use strategy='ddp', 'fsdp' or 'deepspeed', or automatic optimization"
            )
        batch, microbatches = settings.micro_batch_size, self.pipeline.microbatches_per_step
        if self.pipeline.size > 1 and batch is not None and batch % microbatches:
            raise StrategyError(
                f"a batch of {batch} does not divide into microbatches={microbatches} (the pipeline's micro-batches); "
                f"choose a batch size that is a multiple of {microbatches}, or other microbatches"
            )
        super().configure_training(settings)

    def check_module(self, module: nn.Module, parallel_dims: ParallelDims) -> None:
        """Before any process group: head counts divide by the tensor-parallel degree, and the plan
        (found on a trial build of the model on the meta device) names existing modules with known styles."""
        check_head_counts(module, parallel_dims.tp)
        if parallel_dims.cp > 1:
            check_contract(module, parallel_dims.cp)
        if parallel_dims.pp > 1:
            self.pipeline.check_module(module, parallel_dims.pp, self.precision.parameter_dtype)
        if parallel_dims.tp == 1 and parallel_dims.ep == 1:
            return
        try:
            built = build_on_meta(fresh_copy(module), self.precision.parameter_dtype)
        except ConfigError:
            return  # e.g. configure_model() parallelises from self.device_mesh: checked at set-up instead
        if parallel_dims.ep > 1:
            check_expert_parallel(built, parallel_dims.ep)
        if parallel_dims.tp > 1 and not is_tensor_parallel(built):
            check_head_counts(built, parallel_dims.tp)
            plan_targets(self._plan(built, parallel_dims.tp))

    def _plan(self, user_module: nn.Module, tensor_parallel_size: int) -> FoundPlan:
        found = find_plan(user_module, self.tp_plan, self.sequence_parallel)
        if found is None and self.sequence_parallel:
            raise StrategyError(
                f"sequence_parallel=True but {type(user_module).__name__} has no sequence-parallel plan: give the "
                "model a sequence_parallel_tp_plan attribute (see the GPT example), or leave sequence_parallel off "
                "and pass a tp_plan written with the sequence-parallel styles"
            )
        if found is None:
            raise StrategyError(
                f"tensor_parallel_size={tensor_parallel_size} but {type(user_module).__name__} has no tensor-parallel "
                "plan: pass tp_plan={'pattern': 'colwise', ...} to the strategy, give the model a tp_plan "
                "attribute, or parallelise it in configure_model() from self.device_mesh['tp']"
            )
        return with_split_logits(found) if self.loss_parallel else found

    def estimate_memory(self, footprint: ModelFootprint) -> StrategyMemory | None:
        """FSDP's formula over one tensor-parallel rank's share (``model_parallel_memory``). With both sizes
        ``"auto"`` the row is for the degree the footprint measured; otherwise for this strategy's layout."""
        if self.expert_parallel_size > 1:
            return None  # not estimated yet: the experts' share per rank and the dispatch buffers
        if self.context_parallel_size > 1:
            try:
                dims = self.make_parallel_dims(footprint.world_size, footprint.devices)
            except StrategyError:
                return None
            return context_parallel_memory(
                footprint,
                context_parallel_size=self.context_parallel_size,
                tensor_parallel_size=dims.tp,
                cpu_offload=self.cpu_offload,
                name=self.name,
            )
        share = footprint.tensor_parallel
        if share is None:
            return None
        if self.data_parallel_size == "auto" and self.tensor_parallel_size == "auto":
            tp = share.tensor_parallel_size
        else:
            try:
                tp = self.make_parallel_dims(footprint.world_size, footprint.devices).tp
            except StrategyError:
                return None  # sizes that do not fit this layout: no row
        if self.cpu_offload and tp == footprint.world_size:
            return None  # refused at launch: FSDP's offload needs data parallelism
        return model_parallel_memory(footprint, tensor_parallel_size=tp, cpu_offload=self.cpu_offload, name=self.name)

    # ------------------------------------------------------------------ model
    def module_init_context(self) -> contextlib.AbstractContextManager:
        return meta_init_context(self.precision) if self.delayed_init else super().module_init_context()

    def forward_context(self) -> contextlib.AbstractContextManager:
        """FSDP's ``MixedPrecisionPolicy`` casts when data parallel; tensor parallel alone uses autocast.
        With ``loss_parallel``, steps run inside PyTorch's ``loss_parallel()``."""
        precision = contextlib.nullcontext() if self._fsdp_root is not None else super().forward_context()
        return _both(precision, loss_parallel()) if self.loss_parallel else precision

    def backward(
        self,
        loss: torch.Tensor,
        module: nn.Module | None = None,
        run_backward: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """With ``loss_parallel`` the backward of the split cross-entropy runs inside its context too. Under context
        parallelism only inside ``forward_backward``, which splits the batch's sequences around the step."""
        if self.parallel_dims is not None and self.parallel_dims.cp > 1 and not in_split_step():
            raise ConfigError(
                f"context_parallel_size={self.parallel_dims.cp}: this backward ran on a step whose sequences were not "
                "split; run the step through engine.forward_backward(model, compute_loss, batch=batch), which splits "
                "them (the Trainer does)"
            )
        if run_backward is not None and not self.supports_custom_backward:
            raise ConfigError(_NO_CUSTOM_BACKWARD)
        with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
            super().backward(loss, module, run_backward)

    @property
    def supports_custom_backward(self) -> bool:
        return self.pipeline.size == 1

    @property
    def runs_batches_itself(self) -> bool:
        return self._pipeline is not None

    def forward_backward(
        self,
        module: nn.Module,
        compute_loss: Any,
        *,
        synchronize: bool,
        batch: Any = None,
        run_backward: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        with self._split_sequences(module, batch):  # under context parallelism: the sequences split over cp ranks
            if self._pipeline is not None:  # the schedule runs the batch's micro-batches, forward and backward
                if run_backward is not None:
                    raise ConfigError(_NO_CUSTOM_BACKWARD)
                with self.forward_context():
                    return self._pipeline.train_step(self.precision.convert_input(batch), synchronize), None
            loss, outputs = super().forward_backward(
                module, compute_loss, synchronize=synchronize, run_backward=run_backward
            )
        return (loss.full_tensor() if isinstance(loss, DTensor) else loss), outputs  # loss_parallel's replicated loss

    def step_context(self, module: nn.Module, method: str, args: tuple) -> contextlib.AbstractContextManager:
        """Under context parallelism without pipeline stages, a validation or test step runs on this rank's parts of
        the batch's sequences, as a training step does (predict steps run whole: their outputs are per sequence)."""
        if method in ("validation_step", "test_step") and args and self.splits_evaluation:
            return self._split_sequences(module, args[0])
        return contextlib.nullcontext()

    @property
    def splits_evaluation(self) -> bool:
        return self.parallel_dims is not None and self.parallel_dims.cp > 1 and self.pipeline.size == 1

    def combine_sequence_parts(self, values: torch.Tensor, op: str) -> torch.Tensor:
        if not self.splits_evaluation:
            return values
        reduce_op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}.get(
            op, dist.ReduceOp.MIN
        )
        dist.all_reduce(values, op=reduce_op, group=self.device_mesh["cp"].get_group())
        return values / self.parallel_dims.cp if op == "mean" else values  # type: ignore[union-attr]

    def _split_sequences(self, module: nn.Module, batch: Any) -> contextlib.AbstractContextManager:
        """``split_sequences`` over the ``cp`` ranks for the batch's sequence tensors (the module's
        ``context_parallel_inputs``, split in place); nothing without context parallelism."""
        if self.parallel_dims is None or self.parallel_dims.cp == 1:
            return contextlib.nullcontext()
        inputs = sequence_inputs(getattr(module, "module", module), batch, self.parallel_dims.cp)
        return split_sequences(self.device_mesh["cp"], inputs)

    def setup_module(self, module: nn.Module) -> nn.Module:
        assert self.parallel_dims is not None, "connect() first"
        user_module = getattr(module, "module", module)
        module = self.precision.convert_module(module)
        if self.parallel_dims.pp > 1:
            shard = self._fully_shard_stage if self._shards_over > 1 else None
            self._pipeline = self.pipeline.build(
                user_module,
                self.device_mesh,
                self.device,
                self.training.accumulate_grad_batches,
                shard=shard,
                parallelize=self._parallelize_before_stages,
            )
            return PipelineRouter(module, self._pipeline, split=lambda batch: self._split_sequences(module, batch))
        meta = has_meta_tensors(module)
        if not meta and not self.cpu_offload:
            module.to(self.device)
        self._apply_tensor_parallel(user_module)
        self._apply_expert_parallel(user_module)
        if self.activation_checkpointing_policy is not None:
            apply_activation_checkpointing(user_module, self.activation_checkpointing_policy)
        if self._shards_over > 1 and not any(isinstance(m, FSDPModule) for m in user_module.modules()):
            self._fully_shard(module, user_module)
        else:
            apply_compile(units_of(user_module, self.auto_wrap_policy), self._compile_options())
        if isinstance(module, FSDPModule):
            self._fsdp_root = module
        if meta:  # one block at a time: FSDP's units, or under tensor parallelism alone the same blocks
            units = units_of(user_module, self.auto_wrap_policy) if self._fsdp_root is None else []
            materialize(module, torch.device("cpu") if self.cpu_offload else self.device, units)
        return module

    def _parallelize_before_stages(self, user_module: nn.Module) -> None:
        """Under pipeline parallelism, on the whole meta-device model: tensor parallel, activation
        checkpointing, compile (per block), in torchtitan's order; FSDP comes per stage."""
        self._apply_tensor_parallel(user_module)
        if self.activation_checkpointing_policy is not None:
            apply_activation_checkpointing(user_module, self.activation_checkpointing_policy)
        apply_compile(units_of(user_module, self.auto_wrap_policy), self._compile_options())

    def _apply_tensor_parallel(self, user_module: nn.Module) -> None:
        assert self.parallel_dims is not None
        if self.parallel_dims.tp > 1 and not is_tensor_parallel(user_module):
            check_head_counts(user_module, self.parallel_dims.tp)
            apply_plan(self._plan(user_module, self.parallel_dims.tp), self.device_mesh["tp"])

    def _apply_expert_parallel(self, user_module: nn.Module) -> None:
        """The experts of each MoE layer divided over the ``ep`` ranks (``apply_expert_parallel``)."""
        assert self.parallel_dims is not None
        if self.parallel_dims.ep > 1:
            self._expert_mesh = self.parallel_dims.expert_mesh(self.device_mesh)
            self._experts = apply_expert_parallel(user_module, self._expert_mesh["ep"])
            log.info(
                "expert parallel over %d ranks: %d MoE layers, %d experts per rank",
                self.parallel_dims.ep,
                len(self._experts),
                self._experts[0].num_experts // self.parallel_dims.ep,
            )

    def _shard_experts(self) -> None:
        """Each experts module its own FSDP unit over the ranks that hold the same experts (``dp_shard_mod_ep``),
        before the blocks that contain them. Its gradient is the sum over every rank of the expert-parallel group
        whose tokens reached it; divided by the whole data-parallel size, it is the mean the other parameters'
        reduction gives (torchtitan's ``gradient_divide_factor``)."""
        assert self.parallel_dims is not None
        for experts in self._experts:
            sharded = shard_nested_unit(
                experts,
                mesh=self._expert_mesh["dp_shard_mod_ep"],
                mp_policy=self.mixed_precision or mixed_precision_policy(self.precision.name),
                cpu_offload=self.cpu_offload,
                device=self.device,
            )
            sharded.set_gradient_divide_factor(float(self.parallel_dims.dp_shard))
            group = self._expert_mesh["dp_shard_mod_ep"].get_group()
            if group.size() > 1 and dist.get_backend(group) == "gloo":
                # A divide factor other than the group's size is NCCL's PREMUL_SUM, which gloo has not: divide
                # around a plain sum instead (FSDP2's path for backends without it). Not for a group of one, where
                # torch 2.13's FSDP2 would divide twice (its copy for one rank divides, then the post-divide).
                sharded.set_force_sum_reduction_for_comms(True)
        if self._experts:
            # The experts live on the 2-D (dp_shard_mod_ep, ep) mesh; a flattened copy of it lets DTensor reduce
            # their gradient norm (and gather them whole) in one collective rather than one per dimension.
            self._expert_mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard_mod_ep_ep")

    @property
    def _shards_over(self) -> int:
        """The ranks FSDP shards over: data x context parallel ranks (context-parallel ranks hold the same
        parameters and their gradients are averaged over both, as torchtitan does)."""
        assert self.parallel_dims is not None
        return self.parallel_dims.data_parallel_size * self.parallel_dims.cp

    def _fsdp_mesh(self) -> Any:
        """``dp_shard``, or under context parallelism ``dp_shard`` x ``cp`` flattened (``dp_shard_cp``; flattening
        again returns the same mesh)."""
        if self.parallel_dims is None or self.parallel_dims.cp == 1:
            return self.device_mesh["dp_shard"]
        return self.device_mesh["dp_shard", "cp"]._flatten("dp_shard_cp")

    def _apply_fsdp(self, root: nn.Module, units: list[nn.Module], **options: Any) -> FSDPModule:
        """FSDP over the data-parallel dimension (``dp_shard``, with ``cp`` under context parallelism), as
        ``apply_fsdp`` applies it for every strategy."""
        return apply_fsdp(
            root,
            units,
            mesh=self._fsdp_mesh(),
            mp_policy=self.mixed_precision or mixed_precision_policy(self.precision.name),
            cpu_offload=self.cpu_offload,
            device=self.device,
            **options,
        )

    def _fully_shard_stage(self, runner: nn.Module, blocks: list[nn.Module]) -> None:
        """FSDP over a pipeline stage: each block, then the stage (its pieces) as the root. Parameters stay
        gathered from a micro-batch's forward to its backward (torchtitan's choice under pipelining: each
        micro-batch would gather them again). The blocks were compiled before the model was split."""
        self._fsdp_root = self._apply_fsdp(runner, blocks, reshard_after_forward=False)

    def _fully_shard(self, module: nn.Module, user_module: nn.Module) -> None:
        self._shard_experts()
        units = units_of(user_module, self.auto_wrap_policy)
        self._fsdp_root = self._apply_fsdp(module, units, compile=self._compile_options())
        if self.parallel_dims is not None and self.parallel_dims.tp > 1:
            # Parameters the plan split live on the 2-D (dp_shard, tp) mesh (dp_shard_cp under context
            # parallelism); a flattened copy of it lets DTensor reduce their gradient norm in one all-reduce
            # rather than one per dimension.
            data = ("dp_shard",) if self.parallel_dims.cp == 1 else ("dp_shard", "cp")
            self.device_mesh[(*data, "tp")]._flatten("_".join((*data, "tp")))
        log.info(
            "FSDP over %d ranks (data x context parallel): %d units (%s) and the root",
            self._shards_over,
            len(units),
            describe(units),
        )

    def _compile_options(self) -> dict[str, Any] | None:
        """The user's ``compile`` options, with ``dynamic=False`` under tensor parallelism (``compile_options``)."""
        tensor_parallel = self.parallel_dims is not None and self.parallel_dims.tp > 1
        return compile_options(self.compile, tensor_parallel=tensor_parallel)

    def gradient_norm(self, parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor | None:
        """Over every stage too: each rank's norm of what its stages count, combined over the pipeline group."""
        if self._pipeline is None:
            return super().gradient_norm(parameters, norm_type)
        local = super().gradient_norm(self._pipeline.counted_in_norm(list(parameters)), norm_type)
        assert local is not None
        return self._pipeline.combine_norms(local.to(self.device), norm_type)

    def optimizer_state_dict(self, module: nn.Module, optimizer: Any, full: bool = True) -> dict[str, Any]:
        state = super().optimizer_state_dict(module, optimizer, full)
        return self._pipeline.renamed_for_checkpoint(state) if self._pipeline is not None else state

    def load_optimizer_state_dict(
        self, module: nn.Module, optimizer: Any, state: dict[str, Any], full: bool = True
    ) -> None:
        if self._pipeline is not None:  # a tied parameter's copy on another stage than its first name's
            state = self._pipeline.renamed_for_checkpoint(state, loading=True)
        super().load_optimizer_state_dict(module, optimizer, state, full)

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Data-parallel gradient reduction can wait; tensor-parallel collectives are part of each pass."""
        return no_backward_sync(module, enabled)

    def __repr__(self) -> str:
        pipeline = (
            f", pipeline_parallel_size={self.pipeline.size}, pipeline_schedule={self.pipeline.schedule!r}"
            if self.pipeline.size > 1
            else ""
        )
        context = f", context_parallel_size={self.context_parallel_size}" if self.context_parallel_size > 1 else ""
        experts = f", expert_parallel_size={self.expert_parallel_size}" if self.expert_parallel_size > 1 else ""
        return (
            f"ModelParallelStrategy(data_parallel_size={self.data_parallel_size!r}, "
            f"tensor_parallel_size={self.tensor_parallel_size!r}{pipeline}{context}{experts})"
        )


@contextlib.contextmanager
def _both(first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> Iterator[None]:
    with first, second:
        yield


def model_parallel_dims(
    world_size: int,
    local_world_size: int,
    *,
    dp: Size,
    tp: Size,
    pp: int,
    cpu_offload: bool,
    cp: int = 1,
    ep: int = 1,
) -> ParallelDims:
    """``(pp, dp_shard, tp)`` for a run of ``world_size`` ranks (``local_world_size`` per node).

    The pipeline takes ``pp`` groups of ranks; within each, ``"auto"`` sizes resolve as Lightning's
    ``ModelParallelStrategy`` does (tensor parallel over one node's processes, data parallel over the
    nodes) or, with pipeline stages, data parallel over every rank they leave.
    """
    if world_size % pp:
        raise StrategyError(
            f"pipeline_parallel_size={pp} does not divide the {world_size} ranks of the run (devices x num_nodes); "
            f"choose a pipeline_parallel_size that divides {world_size}"
        )
    if world_size % (pp * cp):
        raise StrategyError(
            f"context_parallel_size={cp} does not divide the {world_size} ranks of the run (devices x num_nodes); "
            f"choose a context_parallel_size that divides {world_size}"
        )
    if (cp > 1 or ep > 1) and tp == "auto" and dp == "auto":
        tp = 1  # context or expert parallelism named, tensor parallelism not: the ranks it leaves are data parallel
    ranks, local = world_size // (pp * cp), max(1, local_world_size // (pp * cp))
    where = "the run" if pp == 1 else f"each of the {pp} pipeline stages"
    if tp == "auto" and dp == "auto":
        tp = local if pp == 1 else 1
    elif tp == "auto":
        if ranks % dp:
            raise StrategyError(
                f"data_parallel_size={dp} does not divide the {ranks} ranks of {where} (devices x num_nodes"
                f"{'' if pp == 1 else ' / pipeline_parallel_size'}); choose a data_parallel_size that divides {ranks}"
            )
        tp = ranks // dp
    if ranks % tp:
        raise StrategyError(
            f"tensor_parallel_size={tp} does not divide the {ranks} ranks of {where} (devices x num_nodes"
            f"{'' if pp == 1 else ' / pipeline_parallel_size'}); choose a tensor_parallel_size that divides {ranks}"
        )
    if dp == "auto":
        dp = ranks // tp
    if dp * tp != ranks:
        raise StrategyError(
            f"data_parallel_size={dp} x tensor_parallel_size={tp} = {dp * tp}, but {where} has {ranks} ranks "
            f"(devices x num_nodes{'' if pp == 1 else ' / pipeline_parallel_size'}); choose sizes whose product is {ranks}"
        )
    if cpu_offload and pp > 1:
        raise StrategyError(
            "cpu_offload with pipeline_parallel_size > 1 is not supported yet (FSDP's offload of pipeline stages is "
            "untested); leave cpu_offload out, or use more pipeline stages to fit the model"
        )
    if cpu_offload and dp * cp == 1:
        raise StrategyError(
            "cpu_offload is FSDP's offload, which needs data_parallel_size > 1; with every rank in one "
            f"tensor-parallel group (tensor_parallel_size={tp}) leave it out, or lower tensor_parallel_size"
        )
    return ParallelDims(world_size=world_size, dp_shard=dp, cp=cp, tp=tp, pp=pp, ep=ep)


def model_parallel_memory(
    footprint: ModelFootprint, *, tensor_parallel_size: int, cpu_offload: bool = False, name: str = "model_parallel"
) -> StrategyMemory | None:
    """Per-device bytes at ``tensor_parallel_size`` (data parallelism: the rest of the run's ranks);
    ``None`` when the footprint has no share measured at that degree.

    FSDP's formula over one tensor-parallel rank's share: tensor parallelism splits what a plan names
    among the ``tp`` ranks of a group; the estimate measures that share on the meta device
    (``ModelFootprint.tensor_parallel``, see ``parallel.tensor_parallel.share``). FSDP then shards the
    share over the ``dp`` data-parallel ranks exactly as ``fsdp_memory`` shards a whole model over all
    ranks: each device holds ``1/dp`` of the share's states, gathers two of its units while they run
    (none when ``dp`` is 1), and keeps its own activations."""
    share = footprint.tensor_parallel
    if share is None or share.tensor_parallel_size != tensor_parallel_size:
        return None
    data_parallel = footprint.world_size // tensor_parallel_size
    # FULL_SHARD over the data-parallel ranks: the formula's "all ranks" are those.
    return fsdp_memory(replace(share, devices=data_parallel, num_nodes=1), cpu_offload=cpu_offload, name=name)


def context_parallel_memory(
    footprint: ModelFootprint,
    *,
    context_parallel_size: int,
    tensor_parallel_size: int = 1,
    cpu_offload: bool = False,
    name: str = "model_parallel",
) -> StrategyMemory | None:
    """Per-device bytes with each sequence split over ``context_parallel_size`` ranks: FSDP's formula over the
    run's data x context ranks (parameters are sharded over both), each rank keeping ``1 / cp`` of the step's
    activations (its part of every sequence; the ring's key-value buffers are left out). With tensor parallelism,
    the formula applies to one tensor-parallel rank's share as in ``model_parallel_memory``; ``None`` when the
    footprint has no share measured at ``tensor_parallel_size``."""
    if tensor_parallel_size > 1:
        share = footprint.tensor_parallel
        if share is None or share.tensor_parallel_size != tensor_parallel_size:
            return None
        footprint = replace(share, devices=footprint.world_size // tensor_parallel_size, num_nodes=1)
    split = replace(footprint, activation_bytes=footprint.activation_bytes // context_parallel_size)
    return fsdp_memory(split, cpu_offload=cpu_offload, name=name)


register_strategy(
    "model_parallel",
    ModelParallelStrategy,
    "tensor parallel within groups of ranks (DTensor), FSDP2 across them, pipeline stages, sequences split over "
    "ranks (context parallel), mixture-of-experts layers' experts divided over ranks (expert parallel)",
    auto_priority=300,
)
