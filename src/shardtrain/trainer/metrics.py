"""Metrics logged with ``self.log``: kept as device tensors, reduced over ranks only when written.

One ``all_reduce`` carries every metric of a logging step, and the single host transfer happens
then, not on every step.
"""

from __future__ import annotations

from typing import Callable

import torch


class MetricCollector:
    """Holds the latest value (training) or the running mean (validation) of each metric."""

    def __init__(self, mean_over_batches: bool) -> None:
        self.mean_over_batches = mean_over_batches
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.prog_bar: set[str] = set()

    def update(self, logged: dict[str, tuple[torch.Tensor, bool]]) -> None:
        for name, (value, prog_bar) in logged.items():
            value = value.float()
            if self.mean_over_batches and name in self._sums:
                self._sums[name] = self._sums[name] + value
                self._counts[name] += 1
            else:
                self._sums[name] = value
                self._counts[name] = 1
            if prog_bar:
                self.prog_bar.add(name)

    def __bool__(self) -> bool:
        return bool(self._sums)

    def compute(
        self, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor], device: torch.device
    ) -> dict[str, float]:
        """Reduce every metric over ranks in one collective and return plain floats.

        Every rank must call this at the same point with the same metric names.
        """
        if not self._sums:
            return {}
        names = sorted(self._sums)
        stacked = torch.stack([self._sums[n].to(device) / self._counts[n] for n in names])
        values = all_reduce_mean(stacked).tolist()
        return dict(zip(names, values))

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
