"""Setting up pipeline parallelism for ``ModelParallelStrategy``: the module contract, each rank's stages, and
what the Engine calls in place of the model's ``forward``.

The order, for each rank: find the pipelined model (the ``TrainModule``'s child that holds the
largest ``nn.ModuleList``, or the one its ``pipeline_module`` attribute names); divide it into
stages (``split``); initialise, in one process's order, only what this rank's stages own
(``materialize_owned``); keep only those modules in the model; build a ``StageRunner`` per stage
and PyTorch's schedule over them (``Pipeline``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from shardtrain.errors import ConfigError
from shardtrain.parallel.materialize import has_meta_tensors, materialize_owned, shared_parameters
from shardtrain.parallel.pipeline.schedule import Pipeline, TiedParameter, stage_indices
from shardtrain.parallel.pipeline.split import StageLayout, StageRunner, keep_only, plan_stages

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

CONTRACT = ("pipeline_inputs", "pipeline_loss")


def check_contract(module: nn.Module) -> None:
    """The ``TrainModule`` defines ``pipeline_inputs`` and ``pipeline_loss``: the schedule needs both."""
    missing = [name for name in CONTRACT if not callable(getattr(module, name, None))]
    if missing:
        raise ConfigError(
            f"pipeline parallelism needs {type(module).__name__} to define pipeline_inputs(batch) -> (inputs, targets) "
            f"and pipeline_loss(outputs, targets) -> loss (missing: {', '.join(missing)}); the schedule runs the model "
            "on micro-batches and computes the loss on the last stage. See docs/pipeline_parallel.md"
        )


def pipelined_model(module: nn.Module) -> tuple[str, nn.Module]:
    """The name and module that pipeline parallelism splits (see ``TrainModule.pipelined_model``)."""
    find = getattr(module, "pipelined_model", None)
    if not callable(find):
        raise ConfigError(f"{type(module).__name__} is not a TrainModule: pipeline parallelism needs one")
    return find()


def plan_for(module: nn.Module, num_stages: int, split_points: Sequence[str] | None) -> StageLayout:
    """The stages of ``module``'s pipelined model (raises ``ConfigError`` for split points that cannot work)."""
    name, model = pipelined_model(module)
    return plan_stages(model, num_stages, split_points, prefix=f"{name}.")


def build_pipeline(
    module: nn.Module,
    *,
    mesh: "DeviceMesh",
    device: torch.device,
    num_stages: int,
    stages_per_rank: int,
    schedule: type,
    microbatches: int,
    split_points: Sequence[str] | None,
    accumulate: int,
    shard: Callable[[nn.Module, list[nn.Module]], None] | None = None,
    parallelize: Callable[[nn.Module], None] | None = None,
) -> Pipeline:
    """This rank's stages of ``module`` (a meta-device or real ``TrainModule``) and their schedule.

    ``parallelize(module)``, when given, splits layers over the tensor-parallel ranks (on the whole model:
    it is still on the meta device); ``shard(runner, blocks)`` shards a stage over the data-parallel ranks
    (FSDP). Both run before any tensor is made real."""
    name, model = pipelined_model(module)
    layout = plan_stages(model, num_stages, split_points, prefix=f"{name}.")
    pp_mesh = mesh["pp"]
    indices = stage_indices(pp_mesh.get_local_rank(), pp_mesh.size(), stages_per_rank, schedule)
    owned_names = {owned for index in indices for owned in layout.owned(index)}
    if parallelize is not None:  # before the views copy the modules' hooks
        parallelize(module)
    ties = _tied_across_stages(module, name, layout, owned_names, (schedule, stages_per_rank), mesh)
    runners = [(index, StageRunner(model, layout, index)) for index in indices]
    shared = shared_parameters(module)  # before FSDP replaces a tied parameter by one stage's shards
    if shard is not None:
        for index, runner in runners:
            shard(runner, [model.get_submodule(f"{layout.blocks}.{block}") for block in layout.stages[index]])
    foreign = [model.get_submodule(piece) for piece in _all_parts(model, layout) if piece not in owned_names]
    if has_meta_tensors(module):
        not_owned = {id(m) for part in foreign for m in part.modules()}
        owned = {id(m) for m in module.modules() if id(m) not in not_owned}
        materialize_owned(module, device, list(model.get_submodule(layout.blocks)), owned, shared)
    keep_only(model, owned_names, layout)
    module.to(device)
    pipeline = Pipeline(
        module=module,
        runners=runners,
        num_stages=num_stages,
        schedule=schedule,
        microbatches=microbatches,
        group=pp_mesh.get_group(),
        device=device,
        ties=ties,
    )
    pipeline.accumulate = accumulate
    return pipeline


def _all_parts(model: nn.Module, layout: StageLayout) -> list[str]:
    count = len(model.get_submodule(layout.blocks))
    return [*layout.before, *(f"{layout.blocks}.{index}" for index in range(count)), *layout.after]


def _tied_across_stages(
    module: nn.Module,
    name: str,
    layout: StageLayout,
    owned_names: set[str],
    placement: tuple[type, int],
    mesh: "DeviceMesh",
) -> list[TiedParameter]:
    """Parameters shared by modules of different stages (before anything is split), each with the group of
    the ranks whose stages hold a copy (the pipeline group when every stage does)."""
    model = module.get_submodule(name)
    names = {id(m): n for n, m in model.named_modules()}
    stage_of: dict[str, int] = {part: stage for stage in range(layout.num_stages) for part in layout.owned(stage)}
    pp = mesh["pp"].size()
    rank_of_stage = {stage: rank for rank in range(pp) for stage in stage_indices(rank, pp, placement[1], placement[0])}
    ties = []
    for owners in shared_parameters(model):
        param_names = [f"{names[id(owner)]}.{attr}" if names[id(owner)] else attr for owner, attr in owners]
        stages = {stage_of[part] for part in (_part_of(p, stage_of) for p in param_names) if part is not None}
        if len(stages) < 2:
            continue
        held = tuple(f"{name}.{p}" for p in param_names if _part_of(p, stage_of) in owned_names)
        holders = sorted({rank_of_stage[stage] for stage in stages})
        ties.append(
            TiedParameter(
                names=tuple(f"{name}.{p}" for p in param_names),
                held=held,
                group=_group_of(mesh, holders) if len(holders) < pp else mesh["pp"].get_group(),
            )
        )
    return ties


def _group_of(mesh: "DeviceMesh", pp_ranks: list[int]) -> Any:
    """This rank's group among the ranks at ``pp_ranks`` along the pipeline dimension (other coordinates equal);
    every rank creates every such group, as ``new_subgroups_by_enumeration`` needs."""
    import torch.distributed as dist

    names = list(mesh.mesh_dim_names or ())
    grid = mesh.mesh.movedim(names.index("pp"), -1).reshape(-1, mesh["pp"].size())
    groups = [[int(row[rank]) for rank in pp_ranks] for row in grid]
    mine, _ = dist.new_subgroups_by_enumeration(groups, backend=dist.get_backend())
    return mine


def _part_of(parameter: str, parts: dict[str, Any]) -> str | None:
    """The piece or block a parameter name belongs to (the longest part name it starts with), or the name
    itself for a parameter held beside the blocks."""
    found = [part for part in parts if parameter == part or parameter.startswith(part + ".")]
    return max(found, key=len) if found else None


class PipelineRouter(nn.Module):
    """What the Engine calls in place of the module's ``forward`` under pipeline parallelism.

    Validation runs through the schedule (forward only) and logs ``val_loss``, the mean of
    ``pipeline_loss`` over the batch; anything else that would call the model directly is refused.
    ``split(batch)``: the context each validation batch runs in (under context parallelism, its sequences
    split as the training steps' are: the stages exchange buffers of the shape they learned on the first step).
    """

    def __init__(
        self,
        router: nn.Module,
        pipeline: Pipeline,
        split: Callable[[Any], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        super().__init__()
        self.module = router.module
        self.__dict__["pipeline"] = pipeline
        self.__dict__["split"] = split or (lambda batch: contextlib.nullcontext())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        method = kwargs.pop("_shardtrain_method", "forward")
        if method == "validation_step":
            with self.split(args[0]):
                loss = self.pipeline.eval_step(args[0])
            self.module.log(
                "val_loss", loss, prog_bar=True, sync_dist=True
            )  # every rank has the loss (the schedule shares it)
            return None
        raise RuntimeError(
            f"{type(self.module).__name__}.{method} cannot run under pipeline parallelism: each rank holds only its "
            "stages, so the model runs only through the schedule (the Trainer's training and validation steps). "
            "Load the checkpoint under another strategy to call it"
        )
