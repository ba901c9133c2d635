"""``ModelParallelStrategy``'s pipeline options: checked when the strategy is made, applied at set-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from shardtrain.errors import ConfigError, StrategyError
from shardtrain.parallel.materialize import build_on_meta, fresh_copy
from shardtrain.parallel.pipeline.schedule import V_SHAPED, Pipeline, is_multi_stage, schedule_class
from shardtrain.parallel.pipeline.stages import build_pipeline, check_contract, plan_for

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(kw_only=True, slots=True)
class PipelineOptions:
    """Pipeline parallelism as the user asked for it (see ``ModelParallelStrategy``'s arguments).

    The schedule name is resolved here, so a name torch does not have is refused when the strategy is made.
    """

    size: int = 1
    schedule: str = "1f1b"
    microbatches: int | None = None
    split_points: list[str] | None = None

    def __post_init__(self) -> None:
        for name, value in (("pipeline_parallel_size", self.size), ("microbatches", self.microbatches)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise StrategyError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.split_points is not None and (
            not isinstance(self.split_points, (list, tuple)) or not all(isinstance(p, str) for p in self.split_points)
        ):
            raise StrategyError(f"pipeline_split_points must be a list of module names, got {self.split_points!r}")
        try:
            self.schedule_class
        except ConfigError as error:
            raise StrategyError(str(error)) from None
        if self.size > 1:
            least = self.num_stages if self.schedule_class.__name__ in {"Schedule1F1B", "ScheduleDualPipeV"} else 1
            if self.microbatches_per_step < least:  # torch raises this inside the processes; say it here
                raise StrategyError(
                    f"pipeline_schedule={self.schedule!r} needs at least one micro-batch per stage: microbatches="
                    f"{self.microbatches} is fewer than the {least} stages; raise microbatches, or use 'gpipe'"
                )

    @property
    def schedule_class(self) -> type:
        return schedule_class(self.schedule)

    @property
    def stages_per_rank(self) -> int:
        """1 for single-stage schedules (GPipe, 1F1B); for the others what the split points give, else 2."""
        multi = is_multi_stage(self.schedule_class)
        if self.split_points:
            stages = len(self.split_points) + 1
            if stages % self.size:
                raise StrategyError(
                    f"pipeline_split_points makes {stages} stages, which pipeline_parallel_size={self.size} ranks "
                    "cannot hold equally; give a number of split points that makes a multiple of it, minus one"
                )
            per_rank = stages // self.size
        else:
            per_rank = 2 if multi else 1
        if multi and per_rank < 2:
            raise StrategyError(
                f"pipeline_schedule={self.schedule!r} runs several stages per rank; give 2 x pipeline_parallel_size - 1 "
                "split points (or none), or choose 'gpipe' or '1f1b'"
            )
        if not multi and per_rank > 1:
            raise StrategyError(
                f"pipeline_schedule={self.schedule!r} runs one stage per rank but pipeline_split_points makes "
                f"{per_rank} per rank; choose 'interleaved_1f1b', or give pipeline_parallel_size - 1 split points"
            )
        if self.schedule_class.__name__ in V_SHAPED and per_rank != 2:
            raise StrategyError(f"pipeline_schedule={self.schedule!r} runs exactly two stages per rank")
        return per_rank

    @property
    def num_stages(self) -> int:
        return self.size * self.stages_per_rank

    @property
    def microbatches_per_step(self) -> int:
        """Micro-batches per batch: as given, else one per stage."""
        return self.microbatches if self.microbatches is not None else self.num_stages

    def check_module(self, module: nn.Module, pp: int, dtype: torch.dtype) -> None:
        """Before any process group: the module's contract, and its split on a trial build on the meta device."""
        check_contract(module)
        if pp != self.size:
            return
        try:
            built = build_on_meta(fresh_copy(module), dtype)
        except ConfigError:
            return  # a model that configure_model() cannot build on the meta device: checked at set-up instead
        plan_for(built, self.num_stages, self.split_points)

    def build(
        self,
        module: nn.Module,
        mesh: "DeviceMesh",
        device: torch.device,
        accumulate: int,
        *,
        shard: Callable[[nn.Module, list[nn.Module]], None] | None = None,
        parallelize: Callable[[nn.Module], None] | None = None,
    ) -> Pipeline:
        """This rank's stages of ``module`` and their schedule (at set-up, in every process); ``parallelize(module)``
        applies tensor parallelism to the whole (meta-device) module first, ``shard(stage, blocks)`` FSDP to a stage."""
        check_contract(module)
        return build_pipeline(
            module,
            mesh=mesh,
            device=device,
            num_stages=self.num_stages,
            stages_per_rank=self.stages_per_rank,
            schedule=self.schedule_class,
            microbatches=self.microbatches_per_step,
            split_points=self.split_points,
            accumulate=accumulate,
            shard=shard,
            parallelize=parallelize,
        )
