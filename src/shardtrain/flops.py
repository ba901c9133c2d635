"""FLOPs of a training step, counted from the model, and the peak FLOP/s they are compared with.

* :class:`TrainingFlopCounter` counts the floating-point operations of one forward and backward
  pass with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, attention, convolutions).
  Work recomputed by shardtrain's activation checkpointing is counted apart, so
  :attr:`TrainingFlops.model` is the model's FLOPs (for MFU) and :attr:`TrainingFlops.hardware`
  what the device executed (for HFU).
* :func:`peak_flops` gives the peak of a device for a compute dtype: a table of datasheet figures
  (dense, no sparsity) for CUDA GPUs, and a measured matmul rate (:func:`measure_matmul_flops`)
  where the table has no entry; on CPU one process's share of the cores, measured alone
  (:func:`cpu_peak_flops`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

#: Dense peak FLOP/s from NVIDIA's datasheets (SXM parts unless the name says otherwise).
#: Keys are matched, in order, as substrings of ``torch.cuda.get_device_name()`` (lower case).
#: ``"tf32"`` is the fp32 rate when matmuls may use TF32 (``torch.set_float32_matmul_precision("high")``).
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100 pcie": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "h100 nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "h100": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "a100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "l40s": {"bf16": 362.1e12, "fp16": 362.1e12, "tf32": 183.0e12, "fp32": 91.6e12},
    "l4": {"bf16": 121.0e12, "fp16": 121.0e12, "tf32": 60.0e12, "fp32": 30.3e12},
    "a10g": {"bf16": 70.0e12, "fp16": 70.0e12, "tf32": 35.0e12, "fp32": 31.2e12},
    "a10": {"bf16": 125.0e12, "fp16": 125.0e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "v100": {"fp16": 125.0e12, "fp32": 15.7e12},
    "t4": {"fp16": 65.0e12, "fp32": 8.1e12},
}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype, device: torch.device) -> str:
    """``bf16``/``fp16``/``fp32``, or ``tf32`` for fp32 on CUDA when TF32 matmuls are allowed."""
    name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if name == "fp32" and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return name


def table_peak_flops(device_name: str, dtype: str) -> float | None:
    """The datasheet peak of a GPU named ``device_name`` for ``dtype``, or None if not in the table."""
    lowered = device_name.lower()
    for key, peaks in GPU_PEAK_FLOPS.items():
        if key in lowered:
            return peaks.get(dtype)
    return None


def measure_matmul_flops(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    seconds: float | None = None,
    threads: int | None = None,
) -> float:
    """The best FLOP/s of square ``size`` matmuls on ``device`` in ``dtype`` over ``seconds``.

    On CPU each matmul is timed alone (512: about 3 ms on a core, shorter than a scheduler's time
    slice) for two seconds, with ``threads`` threads (default: this process's), and the fastest
    one counts: the rate when nothing else ran on the cores, which a training step's matmuls
    cannot beat. Timing batches of calls over 0.3 s, as this did before, was pulled down by
    whatever ran meanwhile (53-94 GFLOP/s on one core that reaches 96). See :func:`cpu_peak_flops`.
    """
    cpu = device.type == "cpu"
    n = size or (512 if cpu else 8192)
    repeats = 1 if cpu else 4
    seconds = seconds if seconds is not None else (2.0 if cpu else 0.3)
    previous_threads = torch.get_num_threads()
    if cpu and threads is not None:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm up
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if not cpu:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b, out=out)
            if not cpu:
                torch.cuda.synchronize(device)
            best = max(best, repeats * 2 * n**3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous_threads)


def cpu_threads_per_device(local_world_size: int) -> int:
    """The threads one process's matmuls can use at once: its own, at most its share of the cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores // max(1, local_world_size)))


def cpu_peak_flops(dtype: torch.dtype, local_world_size: int = 1) -> tuple[float, str]:
    """(peak FLOP/s of one process of ``local_world_size`` on this machine, where it comes from).

    A "device" on CPU is one process with its share of the cores. Its peak is a matmul in the
    run's ``dtype`` with the process's threads (at most its share of the cores), measured while
    the other processes are idle: :class:`~shardtrain.callbacks.ThroughputMonitor` lets one rank
    measure while the others wait. Measured at the same time as the other ranks (or while other
    programs run), the figure drops with whatever else shares the cores, and a later step, run
    with the cores to itself, beats it: MFU above 1. Alone, the figure is the most a process can
    get from its cores, so ``achieved / (peak x devices)`` stays below 1; the ranks' contention for
    memory bandwidth shows as lower MFU, as it would against a datasheet.
    """
    threads = cpu_threads_per_device(local_world_size)
    value = measure_matmul_flops(torch.device("cpu"), dtype, threads=threads)
    plural = "s" if threads > 1 else ""
    return value, f"measured cpu {dtype_name(dtype, torch.device('cpu'))} matmul, {threads} thread{plural}, alone"


def peak_flops(device: torch.device, dtype: torch.dtype, local_world_size: int = 1) -> tuple[float, str]:
    """(peak FLOP/s of one device for ``dtype``, where the figure comes from).

    CUDA GPUs in :data:`GPU_PEAK_FLOPS` use the datasheet; a CPU process its share of the cores
    (:func:`cpu_peak_flops`); anything else is measured.
    """
    name = dtype_name(dtype, device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        tabled = table_peak_flops(device_name, name)
        if tabled is not None:
            return tabled, f"datasheet {device_name} {name}"
    if device.type == "cpu":
        return cpu_peak_flops(dtype, local_world_size)
    return measure_matmul_flops(device, dtype), f"measured {device.type} {name} matmul"


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one forward and backward pass on one process."""

    forward: int
    backward: int
    recomputed: int = 0

    @property
    def model(self) -> int:
        """What the model needs (forward + backward): the numerator of MFU."""
        return self.forward + self.backward - self.recomputed

    @property
    def hardware(self) -> int:
        """What was executed, activation recomputation included: the numerator of HFU."""
        return self.forward + self.backward


def _cpu_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    return sdpa_backward_flop_count(grad_out, query, key, value)


#: Operators FlopCounterMode does not know: the CPU kernels of scaled_dot_product_attention.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every count goes to "Global" alone."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _flop_counter_mode() -> FlopCounterMode:
    """A FlopCounterMode with totals only. Its per-module breakdown (a ModuleTracker) puts
    autograd hooks on every module's inputs and outputs, which kept activations alive that
    activation checkpointing frees: +16 MiB of peak memory in the counted step of the benchmark."""
    mode = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    mode.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
    return mode


_active_counter: "TrainingFlopCounter | None" = None


def recomputation_context() -> contextlib.AbstractContextManager:
    """Entered around activation recomputation; counts it apart while a counter is running."""
    if _active_counter is None:
        return contextlib.nullcontext()
    return _active_counter._recomputed_mode()


class TrainingFlopCounter:
    """Counts one training pass in three phases: ``start()``, ``forward_done()``, ``finish()``.

    The phases match the Trainer's hooks (batch start, before backward, after backward), so the
    real first step can be counted without running the model an extra time. As a context
    manager it runs ``start``/``finish``; see :func:`count_training_flops` for a one-call form.
    """

    def __init__(self) -> None:
        self._mode = _flop_counter_mode()
        self._recompute_modes: list[FlopCounterMode] = []
        self._forward: int | None = None
        self.result: TrainingFlops | None = None

    def start(self) -> None:
        global _active_counter
        if _active_counter is not None:
            raise RuntimeError("a TrainingFlopCounter is already counting")
        _active_counter = self
        self._mode.__enter__()

    def forward_done(self) -> None:
        self._forward = self._mode.get_total_flops()

    def finish(self) -> TrainingFlops:
        global _active_counter
        if _active_counter is self:
            _active_counter = None
            self._mode.__exit__(None, None, None)
        total = self._mode.get_total_flops()
        forward = total if self._forward is None else self._forward
        recomputed = sum(mode.get_total_flops() for mode in self._recompute_modes)
        self.result = TrainingFlops(forward=forward, backward=total - forward, recomputed=recomputed)
        return self.result

    def _recomputed_mode(self) -> FlopCounterMode:
        mode = _flop_counter_mode()
        self._recompute_modes.append(mode)
        return mode

    def __enter__(self) -> "TrainingFlopCounter":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def count_training_flops(loss_fn: Callable[[], torch.Tensor]) -> TrainingFlops:
    """FLOPs of ``loss_fn()`` and its backward. Works on meta tensors: build the model under
    ``torch.device("meta")`` to count a model too large to allocate."""
    with TrainingFlopCounter() as counter:
        loss = loss_fn()
        counter.forward_done()
        loss.backward()
    assert counter.result is not None
    return counter.result
