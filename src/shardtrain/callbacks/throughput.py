"""ThroughputMonitor: tokens/s, samples/s, FLOP/s, MFU and peak memory, logged with the metrics.

Nothing it does in a training step waits for the device: per batch it reads tensor shapes and
adds integers. Rates are computed when the Trainer logs (every ``log_every_n_steps``), which is
already the point where the Trainer copies its metrics to the host, so the wall time measured
there matches the device's.

FLOPs are counted from the model: rank 0's first training batch runs under
:class:`shardtrain.flops.TrainingFlopCounter` (forward and backward, the model's FLOPs apart from
activation recomputation), and every later batch is assumed to cost the same. Give
``flops_per_batch`` when batches differ in shape or to skip the count. The first optimizer
step (counting, warm-up) is left out of the timing.

Under tensor parallelism the ranks of a group share one batch, and its FLOPs: the run's FLOP/s
count each batch once (``flops_per_batch`` x data-parallel ranks), and a device's share is that
over all ranks. The count sees split layers at their whole size (DTensor operations), but
attention on a rank's own heads at its share, so it is short by (tp - 1)/tp of the attention
scores' FLOPs (about 4% of the GPT example at sequence length 32 and tp=2; less at widths where
the matrices dominate); give ``flops_per_batch`` for an exact figure.

Under pipeline parallelism each rank holds only its stages, so every rank counts its stages' FLOPs,
and one all-reduce over the pipeline group, once, adds them up to the model's. Under context parallelism
each rank of a group runs its part of every sequence of the group's batch: their counts are added the
same way (over the ``cp`` group). The ring's attention is counted more than once (at the whole sequence's
shape where PyTorch dispatches it, then per ring step on each rank): the GPT benchmark's small model, where
attention is a large share, counts 17% over; give ``flops_per_batch`` for an exact figure. The count is of the
second step (the first also runs the stages' shape inference), and timing starts after it.
"""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING, Any

import torch

from shardtrain.callbacks.base import Callback
from shardtrain.callbacks.progress import ThroughputMeter, batch_size_and_tokens
from shardtrain.flops import TrainingFlopCounter, peak_flops

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer

PREFIX = "throughput/"


class ThroughputMonitor(Callback):
    """Logs, at each logging step, on rank 0:

    ========================================  ====================================================
    ``throughput/tokens_per_sec``             all ranks together (tokens: the first integer
                                              ``[batch, seq]`` tensor of a batch)
    ``throughput/samples_per_sec``            all ranks together
    ``throughput/step_time``                  seconds per optimizer step
    ``throughput/flops_per_sec``              model FLOP/s of all ranks together
    ``throughput/flops_per_sec_per_device``   model FLOP/s of one device
    ``throughput/mfu``                        the above over the device's peak (0 to 1)
    ``throughput/peak_memory_gib``            rank 0's peak: ``max_memory_allocated`` on CUDA,
                                              the process's peak RSS on CPU
    ========================================  ====================================================

    Args:
        peak_flops: the peak FLOP/s of one device. By default a datasheet figure for known CUDA
            GPUs in the run's compute dtype; on CPU, a matmul in that dtype measured at the start
            of training by rank 0, with its threads, while the other ranks wait (one process's
            share of the cores, not depressed by the others: ``shardtrain.flops.cpu_peak_flops``).
        flops_per_batch: model FLOPs of one data-parallel rank's batch (forward and backward of the
            whole model); counted from the first batch if not given.
        count_flops: set False to report no FLOPs or MFU (nothing is counted then).
        prog_bar: show MFU (or tokens/s when there is none) in the progress bar.
    """

    def __init__(
        self,
        peak_flops: float | None = None,
        flops_per_batch: int | None = None,
        count_flops: bool = True,
        prog_bar: bool = True,
    ) -> None:
        self.peak_flops = peak_flops
        self.peak_source = "given" if peak_flops is not None else ""
        self.flops_per_batch = flops_per_batch
        self.count_flops = count_flops
        self.prog_bar = prog_bar
        self._counter: TrainingFlopCounter | None = None
        self._meter = ThroughputMeter()
        self._batches = 0
        self._steps_at_window_start = 0
        self._started = False

    def on_train_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        if self.count_flops and self.peak_flops is None:
            self.peak_flops, self.peak_source = _measure_peak(trainer)
        self._started = False

    def on_train_batch_start(self, trainer: "Trainer", module: "TrainModule", batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero and _counted_in_parts(trainer) is None:  # each stage or cp rank counts its part
            return
        if self._started and trainer.is_global_zero:
            # Counted at its start: a logging step's batch is inside the window its log closes.
            samples, tokens = batch_size_and_tokens(batch)
            self._meter.add(samples * trainer.engine.data_parallel_size, tokens * trainer.engine.data_parallel_size)
            self._batches += 1
        elif (
            self.count_flops
            and self.flops_per_batch is None
            and self._counter is None
            and trainer.global_step == _counting_step(trainer)
        ):
            self._counter = TrainingFlopCounter()
            self._counter.start()

    def on_before_backward(self, trainer: "Trainer", module: "TrainModule", loss: Any) -> None:
        if self._counter is not None and self._counter.result is None:
            self._counter.forward_done()

    def on_after_backward(self, trainer: "Trainer", module: "TrainModule") -> None:  # ends the count
        if self._counter is not None and self._counter.result is None:
            self.flops_per_batch = self._counter.finish().model
            parts = _counted_in_parts(trainer)
            if parts is not None:  # the stages' (or cp ranks') counts add up to the batch's, once, at the first step
                import torch.distributed as dist

                total = torch.tensor(float(self.flops_per_batch), dtype=torch.float64, device=trainer.engine.device)
                dist.all_reduce(total, group=trainer.engine.device_mesh[parts].get_group())
                self.flops_per_batch = int(total.item())

    def on_exception(self, trainer: "Trainer", module: "TrainModule", exception: BaseException) -> None:
        if self._counter is not None and self._counter.result is None:
            self._counter.finish()

    def on_train_batch_end(
        self, trainer: "Trainer", module: "TrainModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._started or not trainer.is_global_zero or trainer.global_step <= _counting_step(trainer):
            return
        # The steps up to FLOP counting (warm-up) are not timed; one wait for the device, once.
        if trainer.engine.device.type == "cuda":
            torch.cuda.synchronize(trainer.engine.device)
        self._meter = ThroughputMeter()
        self._batches = 0
        self._steps_at_window_start = trainer.global_step
        self._started = True

    def on_validation_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        self._meter.pause()

    def on_validation_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        self._meter.resume()

    # ---------------------------------------------------------------- at logging steps
    def on_log(self, trainer: "Trainer", metrics: dict[str, float], step: int) -> None:
        if "train_loss" not in metrics or not self._started or self._batches == 0:
            return
        samples, tokens, elapsed = self._meter.take()
        figures = {f"{PREFIX}samples_per_sec": samples / elapsed}
        if tokens:
            figures[f"{PREFIX}tokens_per_sec"] = tokens / elapsed
        steps = trainer.global_step - self._steps_at_window_start
        if steps:
            figures[f"{PREFIX}step_time"] = elapsed / steps
        if self.flops_per_batch:
            # Each data-parallel rank's batch is one batch of the run: the ranks of a tensor-parallel
            # group share it (and its FLOPs), so the run's FLOPs count every sample once.
            total = self.flops_per_batch * self._batches * trainer.engine.data_parallel_size / elapsed
            per_device = total / trainer.world_size
            figures[f"{PREFIX}flops_per_sec"] = total
            figures[f"{PREFIX}flops_per_sec_per_device"] = per_device
            if self.peak_flops:
                figures[f"{PREFIX}mfu"] = per_device / self.peak_flops
        figures[f"{PREFIX}peak_memory_gib"] = peak_memory_bytes(trainer.engine.device) / 2**30
        self._batches = 0
        self._steps_at_window_start = trainer.global_step
        metrics.update(figures)
        trainer.callback_metrics.update(figures)
        if self.prog_bar:
            shown = "mfu" if f"{PREFIX}mfu" in figures else "tokens_per_sec"
            if f"{PREFIX}{shown}" in figures:
                trainer.progress_bar_metrics[shown] = figures[f"{PREFIX}{shown}"]


def _measure_peak(trainer: "Trainer") -> tuple[float, str]:
    """The peak of one device. A GPU's is its own (datasheet, or measured on it by each rank). On
    CPU the ranks share the cores, so rank 0 measures while the others wait (in the all-reduce that
    hands its figure to every rank): a figure measured while the other ranks also ran would be
    lower than what a step, with the cores to itself, reaches (``shardtrain.flops.cpu_peak_flops``)."""
    engine = trainer.engine
    dtype = engine.precision.compute_dtype
    if engine.device.type != "cpu":
        return peak_flops(engine.device, dtype)
    engine.barrier()  # every rank is done with set-up: the cores are rank 0's
    value, source = (
        peak_flops(engine.device, dtype, engine.environment.local_world_size) if trainer.is_global_zero else (0.0, "")
    )
    shared = engine.all_reduce(torch.tensor([value], dtype=torch.float64, device=engine.device), op="max")
    return float(shared.item()), source or "measured cpu matmul on rank 0, alone"


def _pipelined(trainer: "Trainer") -> bool:
    return trainer.engine.parallel_dims.pp > 1


def _counted_in_parts(trainer: "Trainer") -> str | None:
    """The mesh dimension whose ranks each count a part of a batch's FLOPs, summed once: pipeline stages (each
    runs its blocks), or context-parallel ranks (each runs its part of every sequence); None: rank 0 counts all."""
    dims = trainer.engine.parallel_dims
    return "pp" if dims.pp > 1 else "cp" if dims.cp > 1 else None


def _counting_step(trainer: "Trainer") -> int:
    """The optimizer step whose first batch is counted: the first; under pipeline parallelism the second,
    because the first also runs the stages' shape inference (a forward and a backward more)."""
    return 1 if _pipelined(trainer) else 0


def peak_memory_bytes(device: torch.device) -> int:
    """``max_memory_allocated`` on CUDA; the process's peak resident memory elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
