"""Memory estimation before anything is allocated: a row per registered strategy (``auto`` chooses from it).

Two steps, each in its own place. ``shardtrain.estimate.footprint`` measures the model on the meta device
(parameters, optimizer state, activations: a ``ModelFootprint``). Each registered strategy then
says where it keeps those bytes, in its own ``estimate_memory(footprint)`` (the formulas live
beside the strategies: ``replica_memory`` in ``strategies/ddp.py``, ``fsdp_memory`` in ``fsdp.py``,
``strategies/deepspeed/memory.py``; docs/memory.md has them as tables). This module asks every registered
strategy for its row, orders the rows, and adds the few comparison-only rows.

``str(estimate)`` is the table a person reads; ``strategy="auto"`` uses ``recommend``, which walks
the strategies registered as auto candidates (``register_strategy(..., auto_priority=N)``) in order.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from shardtrain.errors import ConfigError, MissingDependencyError
from shardtrain.estimate.footprint import measure_footprint
from shardtrain.memory import GIB, ModelFootprint, StrategyMemory, parse_memory_size
from shardtrain.strategies import Strategy, available_strategies, create_strategy
from shardtrain.strategies.deepspeed.memory import DEEPSPEED_NVME_SWAP_BUFFERS, DEEPSPEED_REDUCE_BUCKET
from shardtrain.strategies.fsdp import FSDPStrategy
from shardtrain.parallel.tensor_parallel.plan import Plan
from shardtrain.strategies.registry import auto_candidates, strategy_factory

__all__ = [
    "DEEPSPEED_NVME_SWAP_BUFFERS",
    "DEEPSPEED_REDUCE_BUCKET",
    "GIB",
    "MemoryEstimate",
    "ModelFootprint",
    "StrategyMemory",
    "device_memory_bytes",
    "estimate_memory",
    "parse_memory_size",
    "strategy_rows",
]

log = logging.getLogger(__name__)

#: The table's order: a whole replica, FSDP from least to most offloaded, FSDP x tensor parallel, then
#: DeepSpeed by stage.
#: Registered names not listed here (plug-ins) follow, alphabetically.
TABLE_ORDER = (
    "single",
    "ddp",
    "fsdp",
    "fsdp_shard_grad_op",
    "fsdp_hybrid",
    "fsdp_cpu_offload",
    "model_parallel",
    "context_parallel",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme",
)
#: Rows for FSDP layouts that no registered name selects, shown for comparison only (``available=False``).
COMPARISON_ROWS: dict[str, dict[str, Any]] = {
    "fsdp_shard_grad_op": {"sharding_strategy": "SHARD_GRAD_OP"},
    "fsdp_hybrid": {"sharding_strategy": "HYBRID_SHARD"},
}
#: Registered names left out of the table while their row equals another's: one run under two names
#: (``deepspeed`` runs ZeRO stage 2 unless told otherwise).
SAME_RUN_AS = {"deepspeed": "deepspeed_stage_2"}
#: What a strategy that offloads to NVMe is built with here: it needs a path to exist, the estimate writes nothing.
_ESTIMATE_NVME_PATH = "/nonexistent/shardtrain-estimate"


@dataclass(kw_only=True)
class MemoryEstimate:
    """What a model needs per device under each strategy, for a given run layout."""

    model: str
    parameters: int
    trainable_parameters: int
    parameter_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    largest_unit_bytes: int
    devices: int
    num_nodes: int
    precision: str = "32-true"
    #: The tensor-parallel degree of the ``model_parallel`` row; ``None`` when there is no such row.
    tensor_parallel_size: int | None = None
    strategies: list[StrategyMemory] = field(default_factory=list)
    #: The memory to plan against, when known: the table then says which strategies fit.
    device_memory: int | None = None
    host_memory_per_device: int | None = None
    headroom: float = 0.9

    def get(self, strategy: str) -> StrategyMemory:
        found = next((s for s in self.strategies if s.strategy == strategy), None)
        if found is None:
            raise KeyError(f"no estimate for {strategy!r}; estimated: {', '.join(s.strategy for s in self.strategies)}")
        return found

    def recommend(
        self, device_memory: int, host_memory_per_device: int | None = None, headroom: float = 0.9
    ) -> tuple[str, str]:
        """The strategy ``strategy="auto"`` picks, and why: the first candidate whose row fits.

        The candidates are the names registered with ``auto_priority``, lowest first
        (``shardtrain.strategies.registry.auto_candidates``); one without a row here (no formula,
        or none for this layout) is skipped. The built-ins give DDP (``single`` on one device)
        while it fits (fastest), else FSDP, else tensor parallelism with FSDP (``model_parallel``,
        where the model has a plan: it splits activations too), else FSDP with CPU offload, which
        is also the pick when nothing fits: the last candidate is the leanest.

        The DeepSpeed rows are never picked: FSDP covers the same memory range without an optional
        dependency, and DeepSpeed's whole reduce bucket makes its rows larger for small models. Name
        a ``deepspeed_stage_*`` strategy to use one."""
        world = self.devices * self.num_nodes
        rows = {s.strategy: s for s in self.strategies if s.available}
        order = []
        for name in auto_candidates():
            if name in rows:
                order.append(name)
            else:
                log.debug("strategy=auto: candidate %r has no memory estimate for this layout; skipped", name)
        if not order:
            raise ConfigError(
                "strategy='auto' has no candidate with a memory estimate for this layout "
                f"({world} device(s)); name a strategy, or register one with auto_priority"
            )
        for name in order:
            figures = rows[name]
            if figures.fits(device_memory, host_memory_per_device, headroom):
                return name, (
                    f"{name}: needs {figures.device_total / GIB:.2f} GiB per device of {device_memory / GIB:.2f} GiB"
                    f" ({self.parameters / 1e6:.1f}M parameters, {world} device(s))"
                )
        return (
            order[-1],
            f"nothing fits in {device_memory / GIB:.2f} GiB per device; {order[-1]} needs the least device memory",
        )

    def table(self) -> str:
        """Per-device memory under each strategy (in MiB while a whole replica is under 1 GiB); and which fit, when known."""
        known = self.device_memory is not None
        whole_model = self.strategies[0].device_total if self.strategies else 0  # single / ddp
        unit, scale = ("GiB", GIB) if whole_model >= GIB else ("MiB", 2**20)
        header = (
            f"{self.model}: {self.parameters / 1e6:,.1f}M parameters ({self.trainable_parameters / 1e6:,.1f}M trainable),"
            f" {self.precision}, {self.devices} device(s) x {self.num_nodes} node(s)"
        )
        if self.tensor_parallel_size is not None:
            data_parallel = self.devices * self.num_nodes // self.tensor_parallel_size
            header += f"; model_parallel: tensor parallel {self.tensor_parallel_size} x data parallel {data_parallel}"
        columns = ("params", "grads", "optim", "activ", "working", "device", "host/dev")
        rows = [header, "", f"{'strategy':32}" + "".join(f"{c:>9}" for c in columns) + ("  fits" if known else "")]
        for s in self.strategies:
            figures = (s.parameters, s.gradients, s.optimizer, s.activations, s.working, s.device_total)
            line = f"{s.strategy + ('' if s.available else ' *'):32}" + "".join(f"{b / scale:9.2f}" for b in figures)
            line += f"{s.host_per_device / scale:9.2f}"
            if known:
                line += "  yes" if s.fits(self.device_memory, self.host_memory_per_device, self.headroom) else "  no"
            rows.append(line)
        rows.append("")
        rows.append(
            f"{unit} per device; device = params + grads + optim + activ + working; optim includes fp32 master copies"
        )
        if known:
            host = (
                f", {self.host_memory_per_device / GIB:.2f} GiB host memory per device"
                if self.host_memory_per_device is not None
                else ""
            )
            rows.append(f"fits: within {self.headroom:.0%} of {self.device_memory / GIB:.2f} GiB per device{host}")
        if not all(s.available for s in self.strategies):
            rows.append(
                "* for comparison only: not a strategy name, a layout of one (fsdp's sharding_strategy, "
                "model_parallel's context_parallel_size)"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> str:
        payload = asdict(self)
        payload["strategies"] = [{**asdict(s), "device_total": s.device_total} for s in self.strategies]
        return json.dumps(payload, indent=1)


def estimate_memory(
    module: nn.Module | Callable[[], nn.Module],
    *,
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    batch_size: int = 1,
    batch: Any = None,
    activation_checkpointing: bool = False,
    device_memory: int | str | None = None,
    host_memory_per_device: int | str | None = None,
    tensor_parallel_size: int | None = None,
    tp_plan: Plan | None = None,
    sequence_parallel: bool = False,
    context_parallel_size: int | None = None,
) -> MemoryEstimate:
    """Estimate per-device memory of ``module`` under every strategy, allocating nothing.

    ``module`` is a ``TrainModule`` (its ``configure_model()`` and ``configure_optimizers()`` are
    used), a plain module, or a factory. Activations are measured by one ``training_step`` on
    meta tensors: pass ``batch`` (meta or real-shaped tensors, nested in any lists, tuples,
    namedtuples or dicts), or give the module an ``example_batch(batch_size)`` method. With
    ``device_memory`` (bytes or ``"80GiB"``) the printed table says which strategies fit.

    The ``model_parallel`` row is for ``tensor_parallel_size`` ranks per tensor-parallel group (the
    rest of the run's ranks data parallel), split by ``tp_plan`` or the model's own plan (its
    ``sequence_parallel_tp_plan`` with ``sequence_parallel``, as ``ModelParallelStrategy``'s option); one rank's
    share is measured on the meta device (``shardtrain.parallel.tensor_parallel.share``). Default: the devices
    of one node, where the model has a plan that fits them; otherwise there is no such row. A size
    given here must fit: a model without a plan, or head counts it does not divide, raise ``ConfigError``.

    ``context_parallel_size`` adds a ``context_parallel`` row: ``ModelParallelStrategy(context_parallel_size=N)``,
    each sequence split over N ranks (its activations divided by N), parameters sharded over all ranks; with
    ``tensor_parallel_size`` too, ``ModelParallelStrategy(context_parallel_size=N, tensor_parallel_size=T)``: one
    tensor-parallel rank's share sharded over the data x context ranks, its activations divided by N.
    """
    footprint = measure_footprint(
        module,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        batch_size=batch_size,
        batch=batch,
        activation_checkpointing=activation_checkpointing,
        tensor_parallel_size=tensor_parallel_size,
        tp_plan=tp_plan,
        sequence_parallel=sequence_parallel,
    )
    return MemoryEstimate(
        model=type(module).__name__ if isinstance(module, nn.Module) else getattr(module, "__name__", "model"),
        parameters=footprint.parameters,
        trainable_parameters=footprint.trainable_parameters,
        parameter_bytes=footprint.parameter_bytes,
        optimizer_bytes=footprint.optimizer_bytes,
        activation_bytes=footprint.activation_bytes,
        largest_unit_bytes=footprint.largest_unit_bytes,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        tensor_parallel_size=footprint.tensor_parallel.tensor_parallel_size if footprint.tensor_parallel else None,
        strategies=strategy_rows(footprint, context_parallel_size, tensor_parallel_size),
        device_memory=None if device_memory is None else parse_memory_size(device_memory),
        host_memory_per_device=None if host_memory_per_device is None else parse_memory_size(host_memory_per_device),
    )


def strategy_rows(
    footprint: ModelFootprint, context_parallel_size: int | None = None, tensor_parallel_size: int | None = None
) -> list[StrategyMemory]:
    """A row per registered strategy whose ``estimate_memory`` gives one, named as registered, in ``TABLE_ORDER``.

    Each name is built as ``strategy=name`` builds it; a name that cannot be built here (its
    optional backend is missing, or it needs options only a run gives) and a strategy without a
    formula for this layout (``None``) have no row. ``COMPARISON_ROWS`` are added unless a strategy
    registered under their label already gave one; ``SAME_RUN_AS`` aliases are left out.
    """
    registered = available_strategies()
    rows: dict[str, StrategyMemory] = {}
    for name in registered:
        strategy = _build(name)
        row = strategy.estimate_memory(footprint) if strategy is not None else None
        if row is not None:
            rows[name] = replace(row, strategy=name, available=True)
    for label, options in COMPARISON_ROWS.items():
        row = None if label in registered else FSDPStrategy(**options).estimate_memory(footprint)
        if row is not None:
            rows[label] = replace(row, strategy=label, available=False)
    if context_parallel_size is not None and context_parallel_size > 1:
        from shardtrain.strategies.model_parallel import ModelParallelStrategy

        tp = tensor_parallel_size or 1
        strategy = ModelParallelStrategy(context_parallel_size=context_parallel_size, tensor_parallel_size=tp)
        row = strategy.estimate_memory(footprint)
        if row is None:
            raise ConfigError(
                f"context_parallel_size={context_parallel_size}{f' x tensor_parallel_size={tp}' if tp > 1 else ''} "
                f"does not divide the {footprint.world_size} ranks (devices x num_nodes); choose sizes that divide them"
            )
        rows["context_parallel"] = replace(row, strategy="context_parallel", available=False)
    for alias, name in SAME_RUN_AS.items():
        if alias in rows and name in rows and replace(rows[alias], strategy=name) == rows[name]:
            del rows[alias]
    return sorted(rows.values(), key=_table_position)


def _table_position(row: StrategyMemory) -> tuple[int, str]:
    known = row.strategy in TABLE_ORDER
    return (TABLE_ORDER.index(row.strategy) if known else len(TABLE_ORDER), "" if known else row.strategy)


def _build(name: str) -> Strategy | None:
    """The strategy ``strategy=name`` builds with its defaults; ``None`` where it cannot be built without a run."""
    try:
        return create_strategy(name)
    except MissingDependencyError:
        return None  # an optional backend that is not installed
    except ConfigError as error:
        if "nvme_path" not in _parameters(strategy_factory(name)):
            log.debug("no memory estimate for strategy %r: %s", name, error)
            return None
    try:
        return create_strategy(name, nvme_path=_ESTIMATE_NVME_PATH)
    except ConfigError as error:
        log.debug("no memory estimate for strategy %r: %s", name, error)
        return None


def _parameters(factory: Callable[..., Strategy]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # a callable without a readable signature
        return set()


def device_memory_bytes(device_type: str, local_world_size: int) -> tuple[int, int | None]:
    """(memory per device, host memory per device) of this machine; ``SHARDTRAIN_DEVICE_MEMORY`` overrides the first."""
    host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    host_per_device = host_total // max(local_world_size, 1)
    override = os.environ.get("SHARDTRAIN_DEVICE_MEMORY")
    if override:
        return parse_memory_size(override), host_per_device
    if device_type == "cuda":
        return torch.cuda.get_device_properties(0).total_memory, host_per_device
    return host_per_device, None  # on CPU, device memory is host memory
