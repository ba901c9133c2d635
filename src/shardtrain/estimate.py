"""Memory estimation before anything is allocated, and the choice behind ``strategy="auto"``.

The model is built on the meta device (no memory), so its parameters are counted exactly; the
optimizer it configures takes one step on meta gradients, so its state is *read* from the real
optimizer class (AdamW: two fp32 moments; SGD with momentum: one; ...); one training step runs
on meta tensors under a saved-tensors hook, so activation memory is measured from the real
model, with or without activation checkpointing. Per-strategy figures then follow from where
each strategy keeps those bytes (docs/memory.md); the DeepSpeed rows follow what DeepSpeed 0.19
allocates (module weights in the run's 16-bit dtype, an fp32 master partition and fp32 optimizer
state, its reduce bucket), checked against a real 2-rank run's tensors.

``str(estimate)`` is the table a person reads; ``strategy="auto"`` uses ``recommend``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from shardtrain.errors import ConfigError

GIB = 2**30
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
#: DeepSpeed's defaults (shardtrain passes them through unless the options or config set others):
#: the gradient reduce bucket (``reduce_bucket_size``, elements), allocated whole on the device, and
#: the pinned buffers of parameter swapping to NVMe (``offload_param.buffer_count × buffer_size``).
DEEPSPEED_REDUCE_BUCKET = 500_000_000
DEEPSPEED_NVME_SWAP_BUFFERS = 5 * 100_000_000
#: Precisions under which DeepSpeed keeps the module's weights in 16 bits (fp32 master copy aside).
_DEEPSPEED_16_BIT = ("bf16-mixed", "bf16-true", "16-mixed")


def parse_memory_size(text: str | int) -> int:
    """``"80GiB"``, ``"1TiB"``, ``"512MB"`` or a number of bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in (*_UNITS, ""):
        raise ConfigError(f"cannot read memory size {text!r}; write it like 80GiB, 512MiB, 1TB or a number of bytes")
    return int(float(match.group(1)) * _UNITS.get(match.group(2).lower() or "b"))


@dataclass(frozen=True, kw_only=True, slots=True)
class StrategyMemory:
    """Bytes one device (and its host) needs under one strategy."""

    strategy: str
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    working: int  # gathered units and buffers that exist only while a unit runs
    host_per_device: int = 0  # CPU memory per rank, for offloading strategies
    available: bool = True  # False: shown for comparison only, not a strategy name shardtrain accepts

    @property
    def device_total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.working

    def fits(self, device_memory: int, host_memory_per_device: int | None, headroom: float) -> bool:
        host_ok = host_memory_per_device is None or self.host_per_device <= headroom * host_memory_per_device
        return self.device_total <= headroom * device_memory and host_ok


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
        """The strategy ``strategy="auto"`` picks, and why: DDP while it fits (fastest), else FSDP, else FSDP with CPU offload.

        The DeepSpeed rows are never picked: FSDP covers the same memory range without an optional
        dependency, and DeepSpeed's whole reduce bucket makes its rows larger for small models. Name
        a ``deepspeed_stage_*`` strategy to use one."""
        world = self.devices * self.num_nodes
        order = ["ddp", "fsdp", "fsdp_cpu_offload"] if world > 1 else ["single", "fsdp", "fsdp_cpu_offload"]
        for name in order:
            figures = self.get(name)
            if figures.fits(device_memory, host_memory_per_device, headroom):
                return name, (
                    f"{name}: needs {figures.device_total / GIB:.2f} GiB per device of {device_memory / GIB:.2f} GiB"
                    f" ({self.parameters / 1e6:.1f}M parameters, {world} device(s))"
                )
        return (
            "fsdp_cpu_offload",
            f"nothing fits in {device_memory / GIB:.2f} GiB per device; fsdp_cpu_offload needs the least device memory",
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
            rows.append("* for comparison only: not a strategy name shardtrain accepts")
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
) -> MemoryEstimate:
    """Estimate per-device memory of ``module`` under every strategy, allocating nothing.

    ``module`` is a ``TrainModule`` (its ``configure_model()`` and ``configure_optimizers()`` are
    used), a plain module, or a factory. Activations are measured by one ``training_step`` on
    meta tensors: pass ``batch`` (meta or real-shaped tensors, nested in any lists, tuples,
    namedtuples or dicts), or give the module an ``example_batch(batch_size)`` method. With
    ``device_memory`` (bytes or ``"80GiB"``) the printed table says which strategies fit.
    """
    from shardtrain.precision import Precision
    from shardtrain.strategies import available_strategies
    from shardtrain.strategies.activation_checkpoint import apply_activation_checkpointing
    from shardtrain.strategies.policy import repeated_blocks

    if not isinstance(devices, int) or devices < 1 or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(
            f"devices and num_nodes must be whole numbers >= 1, got devices={devices!r}, num_nodes={num_nodes!r}"
        )
    parameter_dtype = Precision(precision).parameter_dtype
    model = _build_on_meta(module, parameter_dtype)
    parameters = list(model.parameters())
    count = sum(p.numel() for p in {id(p): p for p in parameters}.values())
    trainable = sum(p.numel() for p in {id(p): p for p in parameters if p.requires_grad}.values())
    parameter_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in parameters}.values())
    optimizer_bytes = _optimizer_state_bytes(model)
    blocks = repeated_blocks(model)
    largest_unit = max(
        (sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks), default=parameter_bytes
    )
    if activation_checkpointing and blocks:
        apply_activation_checkpointing(model, lambda m: any(m is b for b in blocks))
    activations = _activation_bytes(model, batch, batch_size)
    if Precision(precision).is_mixed:
        activations //= 2  # autocast keeps most saved activations in 16 bits (an estimate; fp32 parts are rare)
    estimate = MemoryEstimate(
        model=type(module).__name__ if isinstance(module, nn.Module) else getattr(module, "__name__", "model"),
        parameters=count,
        trainable_parameters=trainable,
        parameter_bytes=parameter_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activations,
        largest_unit_bytes=largest_unit,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        device_memory=None if device_memory is None else parse_memory_size(device_memory),
        host_memory_per_device=None if host_memory_per_device is None else parse_memory_size(host_memory_per_device),
    )
    accepted = set(available_strategies())
    estimate.strategies = [
        replace(row, available=row.strategy in accepted) for row in _fsdp_rows(estimate) + _deepspeed_rows(estimate)
    ]
    return estimate


def _fsdp_rows(e: MemoryEstimate) -> list[StrategyMemory]:
    world, local = e.devices * e.num_nodes, e.devices
    P, Opt, A, U = e.parameter_bytes, e.optimizer_bytes, e.activation_bytes, e.largest_unit_bytes
    G = P * e.trainable_parameters // max(e.parameters, 1)
    gathered = 2 * U  # the unit running plus the next one being gathered (prefetch)
    single_name = "single" if world == 1 else "ddp"

    def sharded(name: str, ranks: int, working: int) -> StrategyMemory:
        return StrategyMemory(
            strategy=name,
            parameters=P // ranks,
            gradients=G // ranks,
            optimizer=Opt // ranks,
            activations=A,
            working=working,
        )

    return [
        StrategyMemory(strategy=single_name, parameters=P, gradients=G, optimizer=Opt, activations=A, working=0),
        sharded("fsdp", world, gathered if world > 1 else 0),
        sharded("fsdp_shard_grad_op", world, P - P // world),
        sharded("fsdp_hybrid", local, gathered if local > 1 else 0),
        StrategyMemory(
            strategy="fsdp_cpu_offload",
            parameters=0,
            gradients=0,
            optimizer=0,
            activations=A,
            working=gathered,
            host_per_device=(P + G + Opt) // world,
        ),
    ]


def _deepspeed_rows(e: MemoryEstimate) -> list[StrategyMemory]:
    """Where DeepSpeed ZeRO keeps the bytes, rows named as ``strategy=`` takes them.

    The module's weights are 16-bit under bf16/fp16 precision (else as estimated); the optimizer
    updates an fp32 master copy of this rank's partition (counted under optimizer) and keeps its
    state in fp32; gradients are reduced through one whole reduce bucket on the device.
    """
    world = e.devices * e.num_nodes
    bytes_per_parameter = e.parameter_bytes / max(e.parameters, 1)
    element = 2 if e.precision in _DEEPSPEED_16_BIT else bytes_per_parameter
    P = int(e.parameters * element)  # the module's weights as DeepSpeed holds them
    G = int(e.trainable_parameters * element)
    master = 4 * e.trainable_parameters  # fp32 copy of the weights the optimizer updates
    state = int(e.optimizer_bytes * 4 / bytes_per_parameter)  # optimizer state in fp32
    A = e.activation_bytes
    gathered = int(2 * e.largest_unit_bytes * element / bytes_per_parameter)  # ZeRO-3: running + prefetched
    bucket = int(DEEPSPEED_REDUCE_BUCKET * element)
    optimizer = (master + state) // world
    host_offload = (master + state + master) // world  # master, state and the fp32 gradient partition
    return [
        # ZeRO-1: full gradients exist until the end of backward, then only this rank's partition.
        StrategyMemory(
            strategy="deepspeed_stage_1",
            parameters=P,
            gradients=G,
            optimizer=optimizer,
            activations=A,
            working=bucket,
        ),
        StrategyMemory(
            strategy="deepspeed_stage_2",
            parameters=P,
            gradients=G // world,
            optimizer=optimizer,
            activations=A,
            working=bucket,
        ),
        StrategyMemory(
            strategy="deepspeed_stage_2_offload",
            parameters=P,
            gradients=0,
            optimizer=0,
            activations=A,
            working=bucket,
            host_per_device=host_offload + P // world,  # and a 16-bit staging copy of the partition
        ),
        StrategyMemory(
            strategy="deepspeed_stage_3",
            parameters=P // world,
            gradients=G // world,
            optimizer=optimizer,
            activations=A,
            working=gathered + bucket,
        ),
        StrategyMemory(
            strategy="deepspeed_stage_3_offload",
            parameters=0,
            gradients=0,
            optimizer=0,
            activations=A,
            working=gathered + bucket,
            host_per_device=host_offload + P // world,
        ),
        StrategyMemory(
            strategy="deepspeed_stage_3_offload_nvme",
            parameters=0,
            gradients=0,
            optimizer=0,
            activations=A,
            working=gathered + bucket,
            host_per_device=int(DEEPSPEED_NVME_SWAP_BUFFERS * element),  # pinned swap buffers; the rest on disk
        ),
    ]


def _build_on_meta(module: nn.Module | Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = module() if not isinstance(module, nn.Module) else module
            configure = getattr(model, "configure_model", None)
            if callable(configure):
                configure()
    except Exception as error:
        where = (
            getattr(model, "__class__", type(module)).__name__
            if "model" in locals()
            else getattr(module, "__name__", "the model factory")
        )
        raise ConfigError(
            f"building {where} on the meta device failed: {type(error).__name__}: {error}. Every layer must be creatable without data (no .item(), no loading weights in configure_model)"
        ) from error
    finally:
        torch.set_default_dtype(previous)
    real = [name for name, p in model.named_parameters() if not p.is_meta]
    if real:
        raise ConfigError(
            f"{type(model).__name__} created parameters outside the meta device (e.g. {real[:3]}); build layers in configure_model() or the factory"
        )
    return model


def _optimizer_state_bytes(model: nn.Module) -> int:
    configure = getattr(model, "configure_optimizers", None)
    if not callable(configure):
        optimizers = [torch.optim.AdamW(model.parameters())]
    else:
        from shardtrain.optimization import parse_optimizers

        optimizers, _ = parse_optimizers(configure())
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.empty_like(parameter)
    total = 0
    for optimizer in optimizers:
        optimizer.step()
        total += sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
    for parameter in model.parameters():
        parameter.grad = None
    return total


def _activation_bytes(model: nn.Module, batch: Any, batch_size: int) -> int:
    if batch is None:
        example = getattr(model, "example_batch", None)
        if not callable(example):
            return 0
        batch = example(batch_size)
    batch = _to_meta(batch)
    parameters = {id(p) for p in model.parameters()}
    saved: dict[int, tuple[torch.Tensor, int]] = {}  # each saved tensor once; the tensor kept so its id stays unique

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:  # parameters saved for backward are model state, counted already
            saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())
        return tensor

    step = getattr(model, "training_step", None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = step(batch, 0) if callable(step) else model(batch)
    del output
    return sum(nbytes for _, nbytes in saved.values())


def _to_meta(batch: Any) -> Any:
    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not value.is_meta:
            return torch.empty_like(value, device="meta")
        return value

    return tree_map(meta, batch)


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


def choose_strategy(
    module: nn.Module, *, devices: int, num_nodes: int, precision: str, device_type: str, batch_size: int = 1
) -> tuple[str, str]:
    """``strategy="auto"``: the strategy this run should use, from the estimate and the real memory."""
    estimate = estimate_memory(
        _fresh_copy(module), devices=devices, num_nodes=num_nodes, precision=precision, batch_size=batch_size
    )
    device_memory, host_memory = device_memory_bytes(device_type, devices)
    return estimate.recommend(device_memory, host_memory)


def _fresh_copy(module: nn.Module) -> Callable[[], nn.Module]:
    """Estimate on a copy: ``configure_model()`` must run on the user's module only once, for real."""
    import copy

    def factory() -> nn.Module:
        clone = copy.copy(module)
        clone.__dict__ = {
            **module.__dict__,
            "_modules": dict(module._modules),
            "_parameters": dict(module._parameters),
            "_buffers": dict(module._buffers),
        }
        return clone

    factory.__name__ = type(module).__name__
    return factory
