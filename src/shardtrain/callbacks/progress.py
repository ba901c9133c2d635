"""A progress bar on rank 0 with the logged metrics and throughput (tokens/s, samples/s).

Throughput counts the batch's shape only (no host sync): tokens are the elements of the first
integer tensor of a batch (``[batch, seq]`` token ids), samples its first dimension, times the
number of ranks. On a terminal it draws a rich progress bar; otherwise (CI, log files) it prints
one line per logging step.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from shardtrain.callbacks.base import Callback

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer


def batch_size_and_tokens(batch: Any) -> tuple[int, int]:
    """(samples, tokens) of one batch on one rank, read from tensor shapes."""
    tensors = [leaf for leaf in tree_leaves(batch) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        return 0, 0
    ids = next((t for t in tensors if not t.is_floating_point() and t.dim() >= 2), None)
    samples = tensors[0].shape[0] if tensors[0].dim() else 1
    return samples, (ids.numel() if ids is not None else 0)


class ThroughputMeter:
    """Samples and tokens per second of training between two ``rates()`` calls (pauses excluded)."""

    def __init__(self) -> None:
        self._samples = 0
        self._tokens = 0
        self._elapsed = 0.0
        self._since: float | None = time.perf_counter()

    def add(self, samples: int, tokens: int) -> None:
        self._samples += samples
        self._tokens += tokens

    def pause(self) -> None:
        if self._since is not None:
            self._elapsed += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        if self._since is None:
            self._since = time.perf_counter()

    def take(self) -> tuple[int, int, float]:
        """(samples, tokens, seconds) since the last ``take``, and start a new window."""
        self.pause()
        window = (self._samples, self._tokens, max(self._elapsed, 1e-9))
        self._samples, self._tokens, self._elapsed = 0, 0, 0.0
        self.resume()
        return window

    def rates(self) -> dict[str, float]:
        samples, tokens, elapsed = self.take()
        out = {"samples_per_sec": samples / elapsed}
        if tokens:
            out["tokens_per_sec"] = tokens / elapsed
        return out


class ProgressBar(Callback):
    """Rank-0 progress with the ``prog_bar`` metrics and tokens/s."""

    def __init__(self) -> None:
        self._meter = ThroughputMeter()
        self._progress: Any = None
        self._task: Any = None
        self._text = ""
        self._rates: dict[str, float] = {}

    def on_train_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        if not trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        self._meter = ThroughputMeter()
        if console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=console,
                refresh_per_second=4,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=trainer.estimated_stepping_batches, metrics="")

    def on_train_batch_end(
        self, trainer: "Trainer", module: "TrainModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        samples, tokens = batch_size_and_tokens(batch)
        self._meter.add(samples * trainer.engine.data_parallel_size, tokens * trainer.engine.data_parallel_size)
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step)

    def on_validation_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        self._meter.pause()

    def on_validation_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        self._meter.resume()

    def on_log(self, trainer: "Trainer", metrics: dict[str, float], step: int) -> None:
        training = "train_loss" in metrics
        if training:
            self._rates = self._meter.rates()
        parts = [f"{name}={value:.4g}" for name, value in trainer.progress_bar_metrics.items()]
        parts += [f"{name.replace('_per_sec', '/s')}={value:,.0f}" for name, value in self._rates.items()]
        self._text = "  ".join(parts)
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step, metrics=self._text)
        elif training:
            print(f"step {step}/{trainer.estimated_stepping_batches}  {self._text}", flush=True)
        else:
            print(f"validation at step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    def on_train_end(self, trainer: "Trainer", module: "TrainModule") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step)
            self._progress.stop()
            self._progress = None

    def on_exception(self, trainer: "Trainer", module: "TrainModule", exception: BaseException) -> None:
        self.on_train_end(trainer, module)
