"""StragglerMonitor: names a rank that keeps the others waiting because its batches come late.

In a synchronous run every rank steps at the pace of the slowest; one rank whose data loading is slow (a slow
disk or network mount on its node, a heavier share of preprocessing) slows every step, and the step time alone
does not say which rank it is. Each rank's heartbeat (``shardtrain.launch.heartbeat``) adds up the time the rank
waits for its next batch (the Trainer's ``data`` phase: from the end of one step to the start of the next) and
writes the sum to the run's store every few seconds. At each logging step rank 0 reads those sums (a store read:
no collective, no device sync), takes each rank's wait per batch over the window since the last logging step,
and compares the slowest rank's with the median of the others'. A rank more than ``threshold`` x the step time
above them for ``patience`` windows in a row is named, in a warning and in the logged metrics.

What it does not see: a rank slow in its compute (a throttled GPU). Its ranks' step times are equal (each waits
for the slowest in the gradient collectives) and host clocks do not see device time; finding that rank needs
per-kernel timings (PyTorch's profiler, or NVIDIA's resiliency extension).
"""

from __future__ import annotations

import statistics
import warnings
from typing import TYPE_CHECKING

from shardtrain.callbacks.base import Callback

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer

PREFIX = "stragglers/"


class StragglerMonitor(Callback):
    """Logs, at each logging step, on rank 0 (runs of 2 or more processes):

    =================================  ========================================================
    ``stragglers/data_wait_max``       seconds per batch the slowest rank waited for its data
    ``stragglers/data_wait_median``    the same, the median of the other ranks
    ``stragglers/slowest_rank``        that slowest rank
    ``stragglers/straggler``           the rank named a straggler, or -1
    =================================  ========================================================

    Args:
        threshold: a rank is slow in a window when it waited for its batches more than this fraction of the step
            time longer than the median of the other ranks (default 0.1: a tenth of every step lost to that rank).
        patience: windows in a row (logging steps) a rank must be slow before it is named (default 3).
    """

    def __init__(self, threshold: float = 0.1, patience: int = 3) -> None:
        if not threshold > 0 or patience < 1:
            raise ValueError(f"StragglerMonitor needs threshold > 0 and patience >= 1, got {threshold!r}, {patience!r}")
        self.threshold = threshold
        self.patience = patience
        self.straggler: int | None = None
        self._previous: dict[int, tuple[int, float]] | None = None
        self._slow: tuple[int | None, int] = (None, 0)  # (rank, windows in a row)
        self._window_start: tuple[int, float] | None = None

    def on_train_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        self._previous, self._slow, self.straggler = None, (None, 0), None

    def on_log(self, trainer: "Trainer", metrics: dict[str, float], step: int) -> None:
        if "train_loss" not in metrics:
            return
        waits = trainer.engine.data_waits()
        if waits is None:
            return
        previous, self._previous = self._previous, waits
        if previous is None:
            return
        window = {rank: (n - previous[rank][0], s - previous[rank][1]) for rank, (n, s) in waits.items()}
        if any(n <= 0 for n, _ in window.values()):
            self._previous = previous  # a rank's heartbeat has not written since: wait for a longer window
            return
        per_batch = {rank: seconds / n for rank, (n, seconds) in window.items()}
        step_time = metrics.get("throughput/step_time") or _step_time(trainer, self)
        slowest = max(per_batch, key=per_batch.__getitem__)
        median = statistics.median(wait for rank, wait in per_batch.items() if rank != slowest)  # the others
        slow = step_time is not None and per_batch[slowest] - median > self.threshold * step_time
        rank, windows = self._slow
        self._slow = (slowest, windows + 1 if rank == slowest else 1) if slow else (None, 0)
        if self._slow[1] >= self.patience and self.straggler != slowest:
            self.straggler = slowest
            warnings.warn(
                f"rank {slowest} is a straggler: for {self._slow[1]} logging windows it waited "
                f"{per_batch[slowest]:.3f} s per batch for its data, the other ranks {median:.3f} s (median), while a step "
                f"takes {step_time:.3f} s: every rank waits for it. Look at that rank's data loading (its node's "
                "storage, its workers)",
                stacklevel=2,
            )
        figures = {
            f"{PREFIX}data_wait_max": per_batch[slowest],
            f"{PREFIX}data_wait_median": median,
            f"{PREFIX}slowest_rank": float(slowest),
            f"{PREFIX}straggler": float(self.straggler if self.straggler is not None else -1),
        }
        metrics.update(figures)
        trainer.callback_metrics.update(figures)


def _step_time(trainer: "Trainer", monitor: StragglerMonitor) -> float | None:
    """Seconds per optimizer step since the last logging step, on rank 0's clock (when no ThroughputMonitor
    logs ``throughput/step_time``)."""
    import time

    now, start = (trainer.global_step, time.perf_counter()), monitor._window_start
    monitor._window_start = now
    if start is None or now[0] <= start[0]:
        return None
    return (now[1] - start[1]) / (now[0] - start[0])
