"""ModelSummary and RichModelSummary: Lightning's table of a module's layers (name, type, parameters, mode) down to
``max_depth``, with the totals, printed on rank 0 when ``fit`` starts.

Parameters are counted whole: a sharded parameter (a DTensor under FSDP or tensor parallelism) counts its full
size, not the rank's shard, so the table is the same under every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from shardtrain.callbacks.base import Callback

if TYPE_CHECKING:
    from shardtrain.module import TrainModule
    from shardtrain.trainer.trainer import Trainer


@dataclass(frozen=True, slots=True)
class LayerRow:
    name: str
    type: str
    params: int
    mode: str


@dataclass(frozen=True, slots=True)
class Summary:
    rows: list[LayerRow]
    trainable_parameters: int
    total_parameters: int
    #: Bytes of the parameters as stored (their dtypes), in MB as Lightning prints it.
    model_size: float
    modules_in_train_mode: int
    modules_in_eval_mode: int

    def table(self) -> str:
        """Lightning's text table."""
        header = ("", "Name", "Type", "Params", "Mode")
        cells = [header] + [(str(i), r.name, r.type, _count(r.params), r.mode) for i, r in enumerate(self.rows)]
        widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
        lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
        rule = "-" * len(lines[0])
        totals = [
            f"{_count(self.trainable_parameters):<10}Trainable params",
            f"{_count(self.total_parameters - self.trainable_parameters):<10}Non-trainable params",
            f"{_count(self.total_parameters):<10}Total params",
            f"{self.model_size:<10.3f}Total estimated model params size (MB)",
            f"{self.modules_in_train_mode:<10}Modules in train mode",
            f"{self.modules_in_eval_mode:<10}Modules in eval mode",
        ]
        return "\n".join([lines[0], rule, *lines[1:], rule, *totals])


def summarize(module: nn.Module, max_depth: int = 1) -> Summary:
    """The layers of ``module`` down to ``max_depth`` (``-1``: all) and its parameter totals (Lightning's rules)."""
    rows = []
    for name, layer in module.named_modules():
        if not name or (max_depth >= 0 and name.count(".") + 1 > max_depth):
            continue
        rows.append(LayerRow(name, type(layer).__name__, sum(p.numel() for p in layer.parameters()), _mode(layer)))
    parameters = list(module.parameters())
    modes = [sub.training for sub in module.modules()]
    return Summary(
        rows=rows,
        trainable_parameters=sum(p.numel() for p in parameters if p.requires_grad),
        total_parameters=sum(p.numel() for p in parameters),
        model_size=sum(p.numel() * p.element_size() for p in parameters) / 1e6,
        modules_in_train_mode=sum(modes),
        modules_in_eval_mode=len(modes) - sum(modes),
    )


class ModelSummary(Callback):
    """Print the module's layers down to ``max_depth`` (``-1``: all; ``0``: totals only) when ``fit`` starts."""

    def __init__(self, max_depth: int = 1) -> None:
        self.max_depth = max_depth

    def on_fit_start(self, trainer: "Trainer", module: "TrainModule") -> None:
        if trainer.is_global_zero:
            self.show(summarize(module, self.max_depth))

    def show(self, summary: Summary) -> None:
        print(summary.table(), flush=True)


class RichModelSummary(ModelSummary):
    """``ModelSummary`` drawn with ``rich`` (Lightning's ``RichModelSummary``)."""

    def show(self, summary: Summary) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(header_style="bold magenta")
        for column in ("", "Name", "Type", "Params", "Mode"):
            table.add_column(column)
        for index, row in enumerate(summary.rows):
            table.add_row(str(index), row.name, row.type, _count(row.params), row.mode)
        console = Console()
        console.print(table)
        totals = summary.table().split("\n")[len(summary.rows) + 3 :]  # the lines after the table's last rule
        console.print("\n".join(totals), highlight=False)


def _mode(layer: nn.Module) -> str:
    return "train" if layer.training else "eval"


def _count(number: int) -> str:
    """Lightning's short counts: 1.2 K, 3.4 M, 5.6 B."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= threshold:
            return f"{number / threshold:.1f} {suffix}"
    return str(number)
