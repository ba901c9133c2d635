"""The metrics ``self.log`` recorded during one loop run (a training epoch, an evaluation run), reduced as Lightning
reduces them, with no host sync until they are written.

Per step (``on_step``): the latest value of each metric, written every ``log_every_n_steps`` steps. Per epoch
(``on_epoch``): each metric accumulated over the run's batches with its ``reduce_fx``, a mean weighted by the batch
size; a torchmetrics ``Metric`` is computed and reset. A metric logged with both is written as ``name_step`` and
``name_epoch``. When written, every metric logged with ``sync_dist=True`` is reduced over ranks, in one collective
per reduction kind ("sum", "max", "min", "mean") for all of them; the others are each rank's own value. One host
transfer then reads every value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves

from shardtrain.logged import LoggedValue


@dataclass(slots=True)
class Entry:
    """One value to write: ``vector`` (on the device) reduced over ranks with ``op`` when ``sync``, then ``combine``
    turns the reduced vector (as floats) into the metric."""

    name: str
    vector: torch.Tensor
    op: str
    sync: bool
    combine: Callable[[list[float]], float]
    logger: bool = True
    prog_bar: bool = False
    #: The name without ``_step``/``_epoch``, also set in ``callback_metrics`` (Lightning's forked metrics).
    base_name: str | None = None


def _first(values: list[float]) -> float:
    return values[0]


def _ratio(values: list[float]) -> float:
    return values[0] / values[1] if values[1] else float("nan")


class _EpochValue:
    """The running reduction of one metric over a run's batches."""

    def __init__(self, item: LoggedValue) -> None:
        self.item = item
        self.total: torch.Tensor | None = None
        self.weight: torch.Tensor | float = 0.0

    def add(self, item: LoggedValue, batch_size: int) -> None:
        self.item = item  # the latest options (and Metric object)
        if item.is_metric:
            return
        value = item.value.float()
        if item.reduce_fx == "mean":
            value = value * batch_size
            self.weight = self.weight + batch_size
        if self.total is None:
            self.total = value
        elif item.reduce_fx in ("mean", "sum"):
            self.total = self.total + value
        else:
            self.total = (
                torch.maximum(self.total, value) if item.reduce_fx == "max" else torch.minimum(self.total, value)
            )

    def entry(self, name: str, device: torch.device) -> Entry | None:
        item = self.item
        if item.is_metric:  # torchmetrics reduces over ranks itself
            value = item.value.compute()
            item.value.reset()
            return Entry(name, torch.as_tensor(value, device=device).float().reshape(1), "mean", False, _first)
        if self.total is None:
            return None
        if item.reduce_fx == "mean":
            vector = torch.stack([self.total.to(device), torch.as_tensor(self.weight, device=device).float()])
            return Entry(name, vector, "sum", item.sync_dist, _ratio)
        return Entry(name, self.total.to(device).reshape(1), item.reduce_fx, item.sync_dist, _first)


class Results:
    """What ``self.log`` recorded during one loop run; see the module docstring."""

    def __init__(self) -> None:
        self._step: dict[str, LoggedValue] = {}
        self._epoch: dict[str, _EpochValue] = {}

    def add(self, logged: dict[str, LoggedValue], batch: Any = None) -> None:
        """Take the values of one batch (or hook); ``batch`` gives the batch size where none was logged."""
        inferred: int | None = None
        for name, item in logged.items():
            if item.on_step:
                self._step[name] = item
            if item.on_epoch:
                size = item.batch_size
                if size is None:
                    if inferred is None:
                        inferred = batch_size_of(batch)
                    size = inferred
                self._epoch.setdefault(name, _EpochValue(item)).add(item, size)

    def __bool__(self) -> bool:
        return bool(self._step) or bool(self._epoch)

    def take_step_entries(self, device: torch.device) -> list[Entry]:
        """The latest per-step values (then forgotten until logged again)."""
        entries = []
        for name, item in self._step.items():
            value = getattr(item.value, "_forward_cache", None) if item.is_metric else item.value
            if value is None:
                continue
            key = f"{name}_step" if item.on_epoch else name
            vector = torch.as_tensor(value, device=device).detach().float().reshape(1)
            entries.append(
                Entry(
                    key,
                    vector,
                    item.reduce_fx,
                    item.sync_dist and not item.is_metric,
                    _first,
                    item.logger,
                    item.prog_bar,
                    name if item.on_epoch else None,
                )
            )
        self._step.clear()
        return entries

    def epoch_entries(self, device: torch.device) -> list[Entry]:
        """The per-epoch values of the run so far (torchmetrics metrics computed and reset)."""
        entries = []
        for name, accumulated in self._epoch.items():
            item = accumulated.item
            entry = accumulated.entry(f"{name}_epoch" if item.on_step else name, device)
            if entry is not None:
                entry.logger, entry.prog_bar = item.logger, item.prog_bar
                entry.base_name = name if item.on_step else None
                entries.append(entry)
        self._epoch.clear()
        return entries


def reduce_entries(entries: list[Entry], all_reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> dict[str, float]:
    """Every entry's metric: the synced ones reduced over ranks (one collective per reduction kind), then one host
    transfer for all."""
    if not entries:
        return {}
    vectors = [entry.vector for entry in entries]
    for op in ("sum", "max", "min", "mean"):
        synced = [i for i, entry in enumerate(entries) if entry.sync and entry.op == op]
        if not synced:
            continue
        reduced = all_reduce(torch.cat([vectors[i] for i in synced]), op)
        for i, part in zip(synced, reduced.split([vectors[i].numel() for i in synced])):
            vectors[i] = part
    flat = torch.cat(vectors).tolist()  # the one host transfer
    out: dict[str, float] = {}
    start = 0
    for entry, vector in zip(entries, vectors):
        out[entry.name] = entry.combine(flat[start : start + vector.numel()])
        start += vector.numel()
    return out


def batch_size_of(batch: Any) -> int:
    """Lightning's inferred batch size: the first dimension of the batch's first tensor (1 when there is none)."""
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            return int(leaf.shape[0]) if leaf.dim() > 0 else 1
    return 1
