"""The evaluation loop of ``validate``, ``test`` and ``predict`` (and of validation inside ``fit``), with Lightning's
hooks in Lightning's order.

One run over one or several loaders: ``on_<stage>_model_eval`` (default: the model in eval mode), the callbacks' then
the module's ``on_<stage>_start`` and ``on_<stage>_epoch_start``; per batch ``on_<stage>_batch_start``, the step,
``on_<stage>_batch_end``; then ``on_<stage>_epoch_end`` (what it logs joins the run's metrics, as in Lightning),
the metrics reduced over ranks and written once, ``on_<stage>_end``, and ``on_<stage>_model_train`` (default: each
submodule back in the mode it was in). ``validate``/``test`` return one dict of metrics per loader (keys of a loader
among several end in ``/dataloader_idx_<i>``); ``predict`` returns each rank's own ``predict_step`` outputs.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn

from shardtrain.errors import ConfigError
from shardtrain.module import TrainModule
from shardtrain.trainer.arguments import limited_batches
from shardtrain.trainer.hooks import overrides
from shardtrain.logged import LoggedValue, current_hook
from shardtrain.trainer.metrics import Results

if TYPE_CHECKING:
    from shardtrain.engine.wrapper import EngineModule


@dataclass(frozen=True, slots=True)
class Stage:
    """What differs between the evaluation stages: Lightning's names for the hooks, step, loader and limit."""

    #: ``"validate"``, ``"test"`` or ``"predict"``: the ``stage`` that ``setup``/``teardown`` receive.
    name: str
    #: The hooks' infix: ``on_<hooks>_start``, ``on_<hooks>_batch_end``, ...
    hooks: str
    step: str
    dataloader: str
    limit: str

    @property
    def logs(self) -> bool:
        return self.name != "predict"  # Lightning refuses self.log in predict


VALIDATE = Stage("validate", "validation", "validation_step", "val_dataloader", "limit_val_batches")
TEST = Stage("test", "test", "test_step", "test_dataloader", "limit_test_batches")
PREDICT = Stage("predict", "predict", "predict_step", "predict_dataloader", "limit_predict_batches")
STAGES = {stage.name: stage for stage in (VALIDATE, TEST, PREDICT)}


def loader_list(loaders: Any) -> list[Any]:
    """One loader, or a list/tuple of them, as a list."""
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


class EvaluationLoop:
    """Runs one stage over its loaders. ``call(hook, *args)`` runs a hook on the callbacks then the module;
    ``log(entries, extra, step=None, callback_metrics=True)`` reduces the run's metrics (``trainer.metrics.Entry``),
    writes them (at ``step``; None: the Trainer's) and returns them as floats; ``device`` is where the metrics are reduced."""

    def __init__(
        self,
        call: Callable[..., None],
        log: Callable[..., dict[str, float]],
        limit: Callable[[Stage], int | float | None],
        device: Callable[[], torch.device],
        progress: Callable[[str], None] = lambda phase: None,
        combine_parts: Callable[[], Callable[[torch.Tensor, str], torch.Tensor] | None] = lambda: None,
    ) -> None:
        self._device = device
        #: Under context parallelism, ``Engine.combine_sequence_parts`` (None where steps see whole sequences).
        self._combine_parts = combine_parts
        self._progress = progress  # where this rank is, for hang reports (``Engine.progress``)
        self._call = call
        self._log = log
        self._limit = limit
        #: Per loader, the batches evaluated since the stage started: the step of per-batch rows (Lightning's).
        self._batches_seen: collections.Counter[int] = collections.Counter()

    def restart_batch_counts(self) -> None:
        """A new stage (or new loaders): per-batch rows are written from step 0 again."""
        self._batches_seen.clear()

    def run(
        self,
        stage: Stage,
        model: EngineModule,
        module: TrainModule,
        loaders: Sequence[Any],
        *,
        inference_mode: bool = False,
        return_predictions: bool = True,
        extra: dict[str, float] | None = None,
        max_batches: float = math.inf,
        keep_metrics: bool = True,
    ) -> list[Any]:
        """Run ``stage`` over ``loaders``; returns the metrics per loader, or (predict) the outputs per loader.
        ``max_batches`` and ``keep_metrics=False``: the sanity check (at most that many batches a loader, nothing
        logged or kept)."""
        with _evaluation_context(inference_mode):
            modes = _module_modes(model)
            getattr(module, f"on_{stage.hooks}_model_eval")()  # by default: the model in eval mode
            self._call(f"on_{stage.hooks}_start")
            self._call(f"on_{stage.hooks}_epoch_start")
            results = Results()
            extra = dict(extra or {})
            outputs: list[list[Any]] = []
            several = len(loaders) > 1
            for index, loader in enumerate(loaders):
                outputs.append([])
                for batch_idx, batch in self._batches(stage, loader, max_batches):
                    extra_args = (index,) if several else ()
                    self._progress(f"{stage.name} batch {batch_idx}")
                    self._call(f"on_{stage.hooks}_batch_start", batch, batch_idx, *extra_args)
                    with current_hook(module, stage.step):
                        output = getattr(model, stage.step)(
                            *_step_arguments(module, stage, batch, batch_idx, index, several)
                        )
                    parts = self._combine_parts() if stage.name != "predict" else None
                    self._collect(stage, module, results, index if several else None, batch, parts)
                    if stage.name == "predict" and return_predictions:
                        outputs[-1].append(output)
                    self._call(f"on_{stage.hooks}_batch_end", output, batch, batch_idx, *extra_args)
                    self._collect(stage, module, results, index if several else None, batch, parts)
                    step_entries = results.take_step_entries(self._device())
                    if keep_metrics:  # not the sanity check
                        if step_entries:  # on_step=True in evaluation: a row per batch, without the epoch
                            self._log(step_entries, {}, step=self._batches_seen[index], callback_metrics=False)
                        self._batches_seen[index] += 1
            self._call(f"on_{stage.hooks}_epoch_end")
            epoch_end_names = set(module._logged) if stage.logs else set()
            self._collect(stage, module, results, None, None)
            entries = results.epoch_entries(self._device()) + results.take_step_entries(self._device())
            metrics = self._log(entries, extra) if stage.logs and keep_metrics else {}
            self._call(f"on_{stage.hooks}_end")
            if overrides(module, f"on_{stage.hooks}_model_train", TrainModule):
                getattr(module, f"on_{stage.hooks}_model_train")()
            else:
                _restore_modes(model, modes)
        if stage.name == "predict":
            if not return_predictions:
                return []
            return outputs[0] if len(outputs) == 1 else outputs
        return _per_loader(metrics, len(loaders), epoch_end_names)

    def _batches(self, stage: Stage, loader: Any, max_batches: float) -> Iterator[tuple[int, Any]]:
        try:
            num_batches = limited_batches(len(loader), self._limit(stage))
        except TypeError:
            num_batches = math.inf
        num_batches = min(num_batches, max_batches)
        # islice: no batch past the limit is read (nor moved to the device, nor given to the batch-transfer hooks)
        yield from enumerate(loader if math.isinf(num_batches) else itertools.islice(loader, int(num_batches)))

    def _collect(
        self,
        stage: Stage,
        module: TrainModule,
        results: Results,
        loader: int | None,
        batch: Any,
        combine_parts: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    ) -> None:
        logged = module.pop_logged()
        if combine_parts is not None:
            combine_sequence_parts(logged, combine_parts)
        if logged and not stage.logs:
            raise ConfigError(
                f"{type(module).__name__} called self.log({sorted(logged)[0]!r}, ...) in predict, where Lightning refuses "
                "logging too: return the values from predict_step instead"
            )
        if loader is not None:  # Lightning's suffix, unless logged with add_dataloader_idx=False
            logged = {
                (name if item.dataloader_idx == -1 else f"{name}/dataloader_idx_{loader}"): item
                for name, item in logged.items()
            }
        results.add(logged, batch)


def combine_sequence_parts(
    logged: dict[str, LoggedValue], combine: Callable[[torch.Tensor, str], torch.Tensor]
) -> None:
    """Values logged in a step (or its batch hooks) that saw only this rank's parts of the sequences (context
    parallelism): each replaced by its combination over the ranks holding the other parts, by its ``reduce_fx``
    (a mean of equal parts is the whole sequences' mean), one collective per reduction. Every rank of a
    context-parallel group logs the same names (they run one batch). torchmetrics objects are left: their states
    sync over every rank when computed."""
    by_reduction: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(logged):
        if not logged[name].is_metric:
            by_reduction[logged[name].reduce_fx].append(name)
    for reduction, names in sorted(by_reduction.items()):
        values = torch.stack([logged[name].value.detach().to(torch.float32) for name in names])
        combined = combine(values, reduction)
        for name, value in zip(names, combined):
            logged[name].value = value.to(logged[name].value.dtype)


def _step_arguments(
    module: TrainModule, stage: Stage, batch: Any, batch_idx: int, index: int, several: bool
) -> tuple[Any, ...]:
    """Lightning's: ``(batch, batch_idx)`` (or ``(batch,)`` for a step without it), plus ``dataloader_idx`` when
    there are several loaders."""
    arguments = module._step_arguments(stage.step, batch, batch_idx)
    if not several:
        return arguments
    if len(arguments) == 1 or not _takes_dataloader_idx(getattr(module, stage.step)):
        raise ConfigError(
            f"{type(module).__name__}.{stage.step} runs over several dataloaders: give it the arguments "
            "(batch, batch_idx, dataloader_idx=0), as Lightning requires"
        )
    return (*arguments, index)


def _takes_dataloader_idx(step: Callable[..., Any]) -> bool:
    parameters = inspect.signature(step).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters) or any(p.name == "dataloader_idx" for p in parameters):
        return True
    return len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


def _per_loader(metrics: dict[str, float], loaders: int, epoch_end_names: set[str]) -> list[dict[str, float]]:
    """Lightning's results: one dict per loader; a loader's keys among several end in ``/dataloader_idx_<i>``, and
    what ``on_*_epoch_end`` logged is in every dict."""
    if loaders <= 1:
        return [dict(metrics)]
    shared = {name: value for name, value in metrics.items() if name in epoch_end_names}
    return [
        {**{name: value for name, value in metrics.items() if name.endswith(f"/dataloader_idx_{index}")}, **shared}
        for index in range(loaders)
    ]


@contextlib.contextmanager
def _evaluation_context(inference_mode: bool) -> Iterator[None]:
    context = torch.inference_mode() if inference_mode else torch.no_grad()
    with context:
        yield


def _module_modes(model: nn.Module) -> dict[str, bool]:
    return {name: sub.training for name, sub in model.named_modules()}


def _restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Each submodule back in the mode it was in before the run (Lightning's default ``on_*_model_train``)."""
    for name, sub in model.named_modules():
        if name in modes:
            sub.training = modes[name]


def results_table(stage: Stage, results: list[dict[str, float]]) -> str:
    """The metrics of a ``validate``/``test`` run as a plain table (Lightning prints one, rank 0)."""
    if stage.name == "predict" or not any(results):
        return ""
    names = sorted({name for metrics in results for name in metrics})
    header = [f"{stage.name.capitalize()} metric", *(f"DataLoader {i}" for i in range(len(results)))]
    rows = [[name, *(f"{metrics[name]:.6g}" if name in metrics else "" for metrics in results)] for name in names]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
