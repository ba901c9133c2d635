"""Pipeline parallelism on PyTorch's ``torch.distributed.pipelining``: one rank's stages and schedule.

The stages are cut from the user's unchanged model (``split``); the schedules are
PyTorch's (``PipelineStage``, ``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``,
the zero-bubble ones), chosen by name. ``Pipeline`` is what ``ModelParallelStrategy`` holds
when ``pipeline_parallel_size > 1``: it runs a step's micro-batches through the schedule and
answers what the rest of the strategy needs (the loss to log, tied weights, the gradient norm).

* **The loss.** The module's ``pipeline_loss`` runs on the last stage, per micro-batch, divided by
  the micro-batches and the accumulated batches (the schedule's own grad scaling is off, so that
  a parameter shared by two stages on one rank is scaled once). Only the last stage knows the
  loss; without a per-step collective, the others report zero and the last stage the loss times
  the pipeline degree, so the mean over ranks that the Trainer takes at logging steps is the mean
  over data-parallel groups of the step's loss (each rank's number alone is not the loss).
* **Tied weights** on different stages (GPT's output layer and embedding) are one parameter in the
  model and one copy per stage here: their gradients are summed over the pipeline group before
  the optimizer step, as Megatron-LM does for its embeddings, so the copies stay equal. The
  gradient norm counts such a parameter once.
* **Batches of one shape.** The stages exchange buffers whose shapes they learn on the first step;
  every later batch must have that shape (checked on the host, no sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from shardtrain.errors import ConfigError

#: Schedule names (case, ``_`` and ``-`` ignored) to ``torch.distributed.pipelining`` class names.
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved1f1b": "ScheduleInterleaved1F1B",
    "loopedbfs": "ScheduleLoopedBFS",
    "interleavedzerobubble": "ScheduleInterleavedZeroBubble",
    "zbvzerobubble": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
#: Schedules that place a rank's two stages in a V (stage r and 2 * pp - 1 - r) rather than in a loop.
V_SHAPED = {"ScheduleZBVZeroBubble", "ScheduleDualPipeV"}


def schedule_class(name: str) -> type:
    """The ``torch.distributed.pipelining`` schedule class called ``name`` (``"1f1b"``, ``"Interleaved1F1B"``, ...)."""
    from torch.distributed.pipelining import schedules

    key = name.lower().replace("_", "").replace("-", "").replace(" ", "") if isinstance(name, str) else ""
    found = getattr(schedules, SCHEDULES.get(key, ""), None)
    if found is None:
        raise ConfigError(
            f"unknown pipeline_schedule {name!r}; torch.distributed.pipelining has: "
            "gpipe, 1f1b, interleaved_1f1b, looped_bfs, interleaved_zero_bubble, zbv_zero_bubble, dual_pipe_v"
        )
    return found


def is_multi_stage(schedule: type) -> bool:
    """Whether ``schedule`` runs several stages per rank (interleaved, looped, zero-bubble, V)."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    return issubclass(schedule, PipelineScheduleMulti)


def stage_indices(pp_rank: int, pp_size: int, stages_per_rank: int, schedule: type) -> list[int]:
    """The stages rank ``pp_rank`` of the pipeline group runs: in a loop (``r, r + pp, ...``) or a V."""
    if schedule.__name__ in V_SHAPED:
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + round_ * pp_size for round_ in range(stages_per_rank)]


@dataclass(frozen=True, kw_only=True, slots=True)
class TiedParameter:
    """A parameter that modules on different stages share: its names (the first counts in the norm), which
    of them this rank holds, and the group of the ranks that hold a copy."""

    names: tuple[str, ...]
    held: tuple[str, ...]
    group: Any = None  # the ranks whose stages hold a copy (None on a rank that holds none)


class Pipeline:
    """One rank's pipeline stages and their schedule.

    Args:
        module: the ``TrainModule`` (its ``pipeline_inputs``/``pipeline_loss`` and the model it keeps).
        runners: this rank's ``StageRunner`` per stage, with their stage indices.
        num_stages: stages in the whole pipeline.
        schedule: the schedule class; microbatches: micro-batches per step.
        group: the pipeline process group; device: this rank's device.
        ties: parameters shared between stages (``TiedParameter``).
    """

    def __init__(
        self,
        *,
        module: nn.Module,
        runners: Sequence[tuple[int, nn.Module]],
        num_stages: int,
        schedule: type,
        microbatches: int,
        group: dist.ProcessGroup,
        device: torch.device,
        ties: Sequence[TiedParameter],
    ) -> None:
        from torch.distributed.pipelining import PipelineStage

        self.module = module
        self.microbatches = microbatches
        self.group = group
        self.size = dist.get_world_size(group)
        self.ties = list(ties)
        self.stages = [PipelineStage(runner, index, num_stages, device, group=group) for index, runner in runners]
        self.has_first = any(stage.is_first for stage in self.stages)
        self.has_last = any(stage.is_last for stage in self.stages)
        self.accumulate = 1
        self._shape: tuple[tuple[int, ...], ...] | None = None
        self._held: list[tuple[TiedParameter, nn.Parameter]] | None = None
        stages: Any = self.stages if is_multi_stage(schedule) else self.stages[0]
        self.schedule = schedule(stages, n_microbatches=microbatches, loss_fn=self._loss, scale_grads=False)

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: Any, synchronize: bool) -> torch.Tensor:
        """Forward and backward of one batch's micro-batches; returns the loss to log (see the module doc)."""
        return self._run(batch, train=True, synchronize=synchronize)

    def eval_step(self, batch: Any) -> torch.Tensor:
        """Forward only (the schedule's ``eval``); returns the loss to log, as ``train_step``."""
        return self._run(batch, train=False, synchronize=False)

    def _run(self, batch: Any, *, train: bool, synchronize: bool) -> torch.Tensor:
        inputs, targets = self.module.pipeline_inputs(batch)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        self._check_shape(inputs)
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        run = self.schedule.step if train else self.schedule.eval
        options: dict[str, Any] = {"return_outputs": False} if train else {}
        run(
            *(tuple(t for t in inputs if isinstance(t, torch.Tensor)) if self.has_first else ()),  # keywords: below
            target=targets if self.has_last else None,
            losses=losses,
            pipeline_inputs=inputs,
            **options,
        )
        if train and synchronize:
            self.sync_tied_gradients()
        if not losses:
            return torch.zeros((), device=self.stages[0].device)
        whole = [loss.full_tensor() if hasattr(loss, "full_tensor") else loss for loss in losses]  # loss_parallel's
        total = torch.stack([loss.detach().float() for loss in whole]).sum()
        # Training losses were divided by microbatches x accumulate for backward; evaluation's were not.
        mean = total * self.accumulate if train else total / self.microbatches
        return mean * self.size

    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        loss = self.module.pipeline_loss(output, target)
        if self.schedule_has_backward():
            return loss / (self.microbatches * self.accumulate)
        return loss

    def schedule_has_backward(self) -> bool:
        return bool(getattr(getattr(self, "schedule", None), "_has_backward", True))

    def _check_shape(self, inputs: tuple[Any, ...]) -> None:
        shape = tuple(tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor))
        if not shape:
            raise ConfigError("pipeline_inputs(batch) must return the model's inputs as a tensor or a tuple of tensors")
        if shape[0][0] % self.microbatches:
            raise ConfigError(
                f"a batch of {shape[0][0]} does not divide into microbatches={self.microbatches}; choose a batch size "
                "that is a multiple of microbatches"
            )
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ConfigError(
                f"under pipeline parallelism every batch must have the shape of the first ({self._shape}), got {shape}: "
                "the stages exchange buffers of that shape. Drop the last, smaller batch (drop_last=True) or pad "
                "batches to one shape"
            )

    # ------------------------------------------------------------------ gradients
    def _held_ties(self) -> list[tuple[TiedParameter, nn.Parameter]]:
        """The tied parameters this rank holds a copy of, looked up once (set-up has put them in place)."""
        if self._held is None:
            named = dict(self.module.named_parameters(remove_duplicate=False))
            self._held = [(tie, named[tie.held[0]]) for tie in self.ties if tie.held]
        return self._held

    def sync_tied_gradients(self) -> None:
        """Sum, over the ranks that hold a copy, the gradients of parameters that several stages share."""
        for tie, param in self._held_ties():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = param.grad
            if hasattr(grad, "placements") and grad.placements != param.placements:  # e.g. an embedding's Replicate
                grad = param.grad = grad.redistribute(param.device_mesh, param.placements)
            dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=tie.group)

    def renamed_for_checkpoint(self, state: dict[str, Any], *, loading: bool = False) -> dict[str, Any]:
        """An optimizer state dict (``get_optimizer_state_dict``'s) with a tied parameter's state under its
        first name, as one process keys it (``loading``: back to the name this rank holds it by)."""
        names = {tie.held[0]: tie.names[0] for tie in self.ties if tie.held and tie.names[0] not in tie.held}
        if loading:
            names = {canonical: held for held, canonical in names.items()}
        if not names:
            return state
        return {
            "state": {names.get(key, key): value for key, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names.get(name, name) for name in group["params"]]}
                for group in state["param_groups"]
            ],
        }

    def counted_in_norm(self, parameters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``parameters`` without the copies of tied parameters that another stage counts."""
        skip = {id(param) for tie, param in self._held_ties() if tie.names[0] not in tie.held}
        return [p for p in parameters if id(p) not in skip] if skip else list(parameters)

    def combine_norms(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        """The whole model's gradient norm from each rank's norm of the parameters its stages count."""
        if math.isinf(norm_type):
            total = local.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.group)
            return total
        total = local.detach().float().pow(norm_type)
        dist.all_reduce(total, group=self.group)
        return total.pow(1.0 / norm_type)
