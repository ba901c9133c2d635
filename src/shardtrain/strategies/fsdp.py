"""Fully sharded data parallel on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each selected block (by default: each child of the model's largest ``nn.ModuleList``, i.e.
its transformer blocks) becomes an FSDP unit, then the root. Parameters, gradients and
optimizer state are sharded over the ranks; a unit's parameters are all-gathered just
before it runs and freed after. The apply step is ordered as in torchtitan: activation
checkpointing, then FSDP per block, then the root, then delayed initialisation.

Lightning's argument names and values are accepted, so a Lightning strategy line works unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from shardtrain.errors import ConfigError, StrategyError
from shardtrain.memory import ModelFootprint, StrategyMemory
from shardtrain.parallel.dims import ParallelDims
from shardtrain.parallel.activation_checkpoint import apply_activation_checkpointing
from shardtrain.parallel.compile import compile_options
from shardtrain.parallel.fsdp import apply_fsdp, mixed_precision_policy, no_backward_sync
from shardtrain.strategies.base import Strategy
from shardtrain.strategies.capabilities import BackwardSyncControl, DistributedCheckpointState, ShardedGradients
from shardtrain.parallel.materialize import has_meta_tensors, materialize, meta_init_context
from shardtrain.parallel.policy import ModulePolicy, describe, units_of
from shardtrain.strategies.registry import register_strategy

log = logging.getLogger(__name__)

ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"]
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
_HYBRID_ALIASES = {"_HYBRID_SHARD_ZERO2": "HYBRID_SHARD"}


class FSDPStrategy(ShardedGradients, DistributedCheckpointState, BackwardSyncControl, Strategy):
    """Shard parameters, gradients and optimizer state over the ranks with FSDP2.

    Args:
        sharding_strategy: ``"FULL_SHARD"`` (ZeRO-3-like, default): parameters are gathered
            for each unit's forward and again for its backward. ``"SHARD_GRAD_OP"``: kept
            gathered between forward and backward (more memory, less communication).
            ``"NO_SHARD"``: replicated, like DDP. ``"HYBRID_SHARD"``: shard within a node,
            replicate across nodes (needs a 2-D ``device_mesh``).
        device_mesh: ``(replicate, shard)`` sizes for ``HYBRID_SHARD`` (default:
            ``(num_nodes, devices)``), or a ``DeviceMesh`` with dimensions ``("replicate", "shard")``.
        auto_wrap_policy: which modules become FSDP units: module classes, class names, or a
            callable ``(module) -> bool``. Default: the blocks of the largest ``nn.ModuleList``.
        activation_checkpointing_policy: which modules recompute their activations in backward
            (same forms); no model change needed.
        cpu_offload: keep parameters, gradients and optimizer state in CPU memory; each unit is
            copied to the device when it runs (the optimizer step then runs on the CPU).
        mixed_precision: a ``MixedPrecisionPolicy`` that overrides the one derived from the
            Trainer's ``precision``.
        delayed_init: build ``configure_model()`` on the meta device and materialise shard by
            shard (default True), so the full model never exists on one rank.
        compile: ``torch.compile`` each FSDP unit (in place, so parameter names do not change)
            before sharding; ``True`` for the defaults or a dict of ``torch.compile`` options.
    """

    name = "fsdp"
    needs_process_group = True

    def __init__(
        self,
        *,
        sharding_strategy: ShardingStrategy | str = "FULL_SHARD",
        device_mesh: tuple[int, int] | DeviceMesh | None = None,
        auto_wrap_policy: ModulePolicy | None = None,
        activation_checkpointing_policy: ModulePolicy | None = None,
        cpu_offload: bool = False,
        mixed_precision: MixedPrecisionPolicy | None = None,
        delayed_init: bool = True,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        name = getattr(sharding_strategy, "name", sharding_strategy)  # torch's ShardingStrategy enum too
        name = _HYBRID_ALIASES.get(str(name).upper(), str(name).upper())
        if name not in SHARDING_STRATEGIES:
            raise StrategyError(
                f"unknown sharding_strategy {sharding_strategy!r}; choose one of {', '.join(SHARDING_STRATEGIES)}"
            )
        if device_mesh is not None and name != "HYBRID_SHARD":
            raise StrategyError(f"device_mesh is for sharding_strategy='HYBRID_SHARD'; with {name!r} leave it out")
        self.sharding_strategy: str = name
        self.device_mesh_shape = tuple(device_mesh) if isinstance(device_mesh, (tuple, list)) else None
        if device_mesh is not None and self.device_mesh_shape is None and not isinstance(device_mesh, DeviceMesh):
            raise StrategyError(f"device_mesh must be (replicate, shard) sizes or a DeviceMesh, got {device_mesh!r}")
        self._mesh: DeviceMesh | None = device_mesh if isinstance(device_mesh, DeviceMesh) else None
        self.auto_wrap_policy = auto_wrap_policy
        self.activation_checkpointing_policy = activation_checkpointing_policy
        self.cpu_offload = cpu_offload
        self.mixed_precision = mixed_precision
        self.delayed_init = delayed_init
        if not isinstance(compile, (bool, dict)):
            raise StrategyError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")
        self.compile = compile
        self._root: FSDPModule | None = None

    # ------------------------------------------------------------------ layout and mesh
    def make_parallel_dims(self, world_size: int, local_world_size: int) -> ParallelDims:
        """FULL_SHARD and SHARD_GRAD_OP shard over every rank; NO_SHARD replicates; HYBRID_SHARD is
        ``device_mesh`` = (replicate, shard), by default (nodes, devices per node)."""
        if self.sharding_strategy == "NO_SHARD":
            return ParallelDims(world_size=world_size, dp_replicate=world_size, dp_shard=1)
        if self.sharding_strategy != "HYBRID_SHARD":
            return ParallelDims(world_size=world_size, dp_shard=world_size)
        if isinstance(self._mesh, DeviceMesh):
            replicate, shard = self._mesh.shape
        else:
            replicate, shard = self.device_mesh_shape or (max(1, world_size // local_world_size), local_world_size)
        if self.device_mesh_shape is not None and (
            len(self.device_mesh_shape) != 2 or any(not isinstance(n, int) or n < 1 for n in self.device_mesh_shape)
        ):
            raise StrategyError(f"device_mesh must be (replicate, shard) sizes, got {self.device_mesh_shape!r}")
        if replicate * shard != world_size:
            raise StrategyError(
                f"device_mesh {(replicate, shard)} has {replicate * shard} ranks but the run has {world_size} "
                f"(devices x num_nodes); choose (replicate, shard) with replicate * shard = {world_size}"
            )
        return ParallelDims(world_size=world_size, dp_replicate=replicate, dp_shard=shard)

    def mesh(self) -> DeviceMesh:
        """What FSDP shards over: the run's ``dp_shard`` sub-mesh, or ``("dp_replicate", "dp_shard")``
        when there are replicas (HYBRID_SHARD, NO_SHARD); a ``DeviceMesh`` given by the user as is."""
        if self._mesh is None:
            assert self.parallel_dims is not None, "connect() first"
            replicated = self.parallel_dims.dp_replicate > 1
            self._mesh = self.device_mesh["dp_replicate", "dp_shard"] if replicated else self.device_mesh["dp_shard"]
        return self._mesh

    # ------------------------------------------------------------------ model
    def module_init_context(self) -> contextlib.AbstractContextManager:
        return meta_init_context(self.precision) if self.delayed_init else super().module_init_context()

    def forward_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # precision is FSDP's MixedPrecisionPolicy, not autocast

    def mixed_precision_policy(self) -> MixedPrecisionPolicy:
        """bf16-mixed: bf16 all-gather and compute, fp32 gradient reduction, fp32 master weights."""
        return self.mixed_precision or mixed_precision_policy(self.precision.name)

    def setup_module(self, module: nn.Module) -> nn.Module:
        user_module = getattr(module, "module", module)
        module = self.precision.convert_module(module)
        if self.activation_checkpointing_policy is not None:
            apply_activation_checkpointing(user_module, self.activation_checkpointing_policy)
        units = units_of(user_module, self.auto_wrap_policy)
        if self.training.manual_optimization:
            units = units_for_manual_optimization(user_module, units)
        meta = has_meta_tensors(module)
        if not meta and not self.cpu_offload:
            module.to(self.device)
        self._root = apply_fsdp(
            module,
            units,
            mesh=self.mesh(),
            mp_policy=self.mixed_precision_policy(),
            cpu_offload=self.cpu_offload,
            device=self.device,
            reshard_after_forward=self.sharding_strategy != "SHARD_GRAD_OP",
            compile=compile_options(self.compile),
        )
        if meta:
            materialize(module, torch.device("cpu") if self.cpu_offload else self.device)
        log.info(
            "FSDP %s over mesh %s: %d units (%s) and the root",
            self.sharding_strategy,
            tuple(self.mesh().shape),
            len(units),
            describe(units),
        )
        return module

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        return no_backward_sync(module, enabled)

    def estimate_memory(self, footprint: ModelFootprint) -> StrategyMemory | None:
        """Sharded as ``sharding_strategy`` says, offloaded with ``cpu_offload`` (``fsdp_memory``)."""
        return fsdp_memory(
            footprint,
            sharding_strategy=self.sharding_strategy,
            cpu_offload=self.cpu_offload,
            shard_ranks=self.device_mesh_shape[-1] if self.device_mesh_shape else None,
            name=self.name,
        )

    def __repr__(self) -> str:
        return f"FSDPStrategy(sharding_strategy={self.sharding_strategy!r}, cpu_offload={self.cpu_offload})"


def units_for_manual_optimization(root: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """``units`` and every child of ``root`` that holds parameters: under manual optimization backward runs inside
    the root's forward (the training step), where FSDP's root-level backward hooks cannot reduce; each unit's own
    forward and backward hooks do. Refuses parameters held by ``root`` itself."""
    own = [name for name, _ in root.named_parameters(recurse=False)]
    if own:
        raise ConfigError(
            f"under FSDP, manual optimization needs every parameter inside a submodule, but {type(root).__name__} "
            f"holds {own} directly: move them into a child module (e.g. an nn.ParameterDict or a small nn.Module)"
        )
    children = [child for child in root.children() if child not in units and any(True for _ in child.parameters())]
    return children + units  # outer first: apply_fsdp shards innermost first


def fsdp_memory(
    footprint: ModelFootprint,
    *,
    sharding_strategy: str = "FULL_SHARD",
    cpu_offload: bool = False,
    shard_ranks: int | None = None,
    name: str = "fsdp",
) -> StrategyMemory:
    """Per-device bytes under FSDP2, the row labelled ``name``.

    Parameters, gradients and optimizer state are split over the ranks that shard them: all ranks
    (``FULL_SHARD``, ``SHARD_GRAD_OP``), the ranks of one node (``HYBRID_SHARD``) or none
    (``NO_SHARD``, a replica like DDP). While a unit runs, its parameters are gathered whole: the
    running unit and the prefetched next one (2U, U the largest unit), or under ``SHARD_GRAD_OP``
    every unit's, kept gathered from forward to backward. With ``cpu_offload`` the shards live in
    host memory and only the gathered units are on the device. Checked against real 2-rank runs
    (``tests/distributed/test_estimate_vs_measured.py``); see docs/memory.md.

    ``shard_ranks`` is the shard size of a ``HYBRID_SHARD`` mesh (default: the devices of a node).
    """
    ranks = _shard_ranks(footprint, sharding_strategy, shard_ranks)
    P, G, Opt = footprint.parameter_bytes, footprint.gradient_bytes, footprint.optimizer_bytes
    gathered = 2 * footprint.largest_unit_bytes  # the unit running plus the next one being gathered (prefetch)
    if cpu_offload:
        # Units are copied to the device to run, even on one rank; under SHARD_GRAD_OP all of them stay there.
        working = P if sharding_strategy == "SHARD_GRAD_OP" else gathered
        return StrategyMemory(
            strategy=name,
            parameters=0,
            gradients=0,
            optimizer=0,
            activations=footprint.activation_bytes,
            working=working,
            host_per_device=(P + G + Opt) // ranks,
        )
    if sharding_strategy == "SHARD_GRAD_OP":
        working = P - P // ranks  # the other ranks' parameters, kept gathered between forward and backward
    else:
        working = gathered if ranks > 1 else 0  # one rank holds every parameter already: nothing to gather
    return StrategyMemory(
        strategy=name,
        parameters=P // ranks,
        gradients=G // ranks,
        optimizer=Opt // ranks,
        activations=footprint.activation_bytes,
        working=working,
    )


def _shard_ranks(footprint: ModelFootprint, sharding_strategy: str, shard_ranks: int | None) -> int:
    if sharding_strategy == "NO_SHARD":
        return 1
    if sharding_strategy == "HYBRID_SHARD":
        return shard_ranks or footprint.devices
    return footprint.world_size


register_strategy(
    "fsdp", FSDPStrategy, "FSDP2: parameters, gradients and optimizer state sharded over ranks", auto_priority=200
)
register_strategy(
    "fsdp_cpu_offload",
    FSDPStrategy,
    "FSDP2 with parameters, gradients and optimizer state in CPU memory",
    auto_priority=400,
    cpu_offload=True,
)
