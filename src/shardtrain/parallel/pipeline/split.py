"""Pipeline stages cut from an unchanged model: which modules each stage owns, and how a stage runs.

A model is split at its blocks: the children of its largest ``nn.ModuleList`` (or of the list
the split points name). Every other module with parameters is a *piece*: those registered before
the blocks (embeddings) belong to the first stage, those registered after them (final norm,
output layer) to the last. Modules without parameters (rotary embeddings, dropout) run on every
stage. Parameters held directly by the modules on the path to the blocks (a hand-written GPT's
``self.pos``, a ViT's ``cls_token``) belong to the first stage: a ``forward`` uses them before the
blocks. The model's ``forward`` is not changed and not traced: each stage runs it whole, on a
*view* of the model in which what the stage does not own is replaced by a stand-in.

* ``_Feed`` stands in for the pieces and blocks before the stage: it returns the activation the
  stage received, so whatever the ``forward`` computes from them has the shape of the hidden state
  (an embedding's output) and costs one elementwise operation;
* the stage's first block reads the received activation, whatever it was passed (``_Boundary``);
* its last block's output is what the stage sends on; ``_Pass`` stands in for what comes after it
  (it returns its first argument), so the rest of the ``forward`` runs through without compute;
* ``ParameterStandIn`` stands in, after the first stage, for a parameter held beside the blocks: what the
  ``forward`` computes from it before the blocks is never used, so it computes nothing (shapes follow
  on the meta device). Touched after the stage's first block has run, it refuses the model: the
  parameter is used in or after the blocks, where the first stage does not run.

A view is a shallow copy of the modules on the path from the model's root to what it replaces:
the blocks and pieces themselves are the model's own objects, so parameter names do not change
and a checkpoint saved under pipeline parallelism loads anywhere else. The model the rank keeps
(its ``state_dict``, its optimizer's parameters) holds only the modules of the rank's stages;
``Absent`` stands in for the rest, and a parameter held beside the blocks is ``None`` on ranks
without the first stage. A view shares the ``_parameters`` and ``_buffers`` of the modules it copies
(it replaces only submodules), so FSDP's sharding and the initialisation that replace them in the
model are seen by the view, and the reverse.

This works for a ``forward`` that runs pieces, then the blocks in order, then pieces, passing the
hidden state to each block as its first argument (the transformer models of most libraries).
Blocks must return the hidden state as one tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from shardtrain.errors import ConfigError
from shardtrain.module import pipeline_call
from shardtrain.parallel.pipeline.stand_in import ParameterStandIn


@dataclass(frozen=True, kw_only=True, slots=True)
class StageLayout:
    """How a model divides into pipeline stages; names are relative to the pipelined module.

    Args:
        blocks: the name of the ``nn.ModuleList`` whose children are split between stages.
        stages: for each stage, the block indices it runs (consecutive).
        before: pieces with parameters registered before the blocks (the first stage's).
        after: pieces with parameters registered after the blocks (the last stage's).
        parameters: parameters held beside the blocks by the modules on the path to them (the first stage's).
    """

    blocks: str
    stages: tuple[range, ...]
    before: tuple[str, ...]
    after: tuple[str, ...]
    parameters: tuple[str, ...] = ()

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def owned(self, stage: int) -> list[str]:
        """The names of what ``stage`` owns (parameters held beside the blocks, pieces, blocks), in the model's order."""
        names = [*self.parameters, *self.before] if stage == 0 else []
        names += [f"{self.blocks}.{index}" for index in self.stages[stage]]
        return names + (list(self.after) if stage == self.num_stages - 1 else [])


def plan_stages(
    model: nn.Module, num_stages: int, split_points: Sequence[str] | None = None, prefix: str = ""
) -> StageLayout:
    """Divide ``model`` into ``num_stages`` stages: at ``split_points`` (names of the blocks where stages
    begin, written as seen from the ``TrainModule``, with ``prefix`` the pipelined module's name), or
    by default in runs of equal length (the first stages take one more block where they cannot be equal)."""
    blocks_name = _blocks_of(model, split_points, prefix)
    count = len(model.get_submodule(blocks_name))
    if split_points:
        starts = [_block_index(point, blocks_name, prefix, count) for point in split_points]
        if starts != sorted(set(starts)) or starts[0] == 0:
            raise ConfigError(
                f"pipeline_split_points {list(split_points)} must name blocks in increasing order, after the first "
                "(the first stage starts at block 0)"
            )
        if len(starts) + 1 != num_stages:
            raise ConfigError(
                f"pipeline_split_points gives {len(starts) + 1} stages, but the layout needs {num_stages} "
                "(pipeline_parallel_size x stages per rank); give one split point fewer than the stages"
            )
        bounds = [0, *starts, count]
    else:
        if num_stages > count:
            raise ConfigError(
                f"{num_stages} pipeline stages but the model has {count} blocks ({prefix + blocks_name}); "
                "lower pipeline_parallel_size (or the stages per rank of an interleaved schedule)"
            )
        sizes = [count // num_stages + (1 if stage < count % num_stages else 0) for stage in range(num_stages)]
        bounds = [sum(sizes[:stage]) for stage in range(num_stages + 1)]
    before, after, parameters = _pieces(model, blocks_name)
    stages = tuple(range(bounds[i], bounds[i + 1]) for i in range(num_stages))
    return StageLayout(
        blocks=blocks_name, stages=stages, before=tuple(before), after=tuple(after), parameters=tuple(parameters)
    )


def _blocks_of(model: nn.Module, split_points: Sequence[str] | None, prefix: str) -> str:
    if split_points:
        parent = _relative(split_points[0], prefix).rpartition(".")[0]
        if not isinstance(_get(model, parent), nn.ModuleList):
            raise ConfigError(
                f"pipeline split point {split_points[0]!r} is not a block of an nn.ModuleList of the pipelined model "
                f"({_list_names(model, prefix)})"
            )
        return parent
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(
            f"{type(model).__name__} has no nn.ModuleList of blocks to split into pipeline stages; keep the "
            "repeated blocks in an nn.ModuleList, or name the pipelined module with pipeline_module"
        )
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0]


def _block_index(point: str, blocks_name: str, prefix: str, count: int) -> int:
    parent, _, index = _relative(point, prefix).rpartition(".")
    if parent != blocks_name or not index.isdigit() or int(index) >= count:
        raise ConfigError(
            f"unknown pipeline split point {point!r}: split points name blocks of {prefix + blocks_name} "
            f"({prefix + blocks_name}.1 ... {prefix + blocks_name}.{count - 1})"
        )
    return int(index)


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _list_names(model: nn.Module, prefix: str) -> str:
    names = [prefix + n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return "its lists: " + ", ".join(names) if names else "it has none"


def _pieces(model: nn.Module, blocks_name: str) -> tuple[list[str], list[str], list[str]]:
    """The modules with parameters beside the path from ``model`` to its blocks, before and after it, and the
    parameters that the modules on the path hold themselves."""
    before: list[str] = []
    after: list[str] = []
    parameters: list[str] = []
    parts = blocks_name.split(".")
    container, path = model, ""
    for part in parts:
        parameters += [f"{path}{name}" for name, p in container._parameters.items() if p is not None]
        seen_path = False
        for name, child in container.named_children():
            if name == part:
                seen_path = True
                continue
            if any(True for _ in child.parameters()):
                (after if seen_path else before).append(f"{path}{name}")
        container, path = container.get_submodule(part), f"{path}{part}."
    return before, after, parameters


# ---------------------------------------------------------------------------------------------- views
class StageRunner(nn.Module):
    """What a ``PipelineStage`` runs for one stage: the model's own ``forward`` on the stage's view.

    ``forward(*received, pipeline_inputs=...)``: the first stage receives the model's inputs, the
    others the previous stage's activation; every stage is also given the micro-batch's inputs
    (``pipeline_inputs``, a keyword the schedule splits like the arguments), to run the ``forward``.
    The last stage returns the model's output; a mapping (transformers' ``ModelOutput``) as the
    tuple of its tensors, since the schedule passes on only tensors.
    """

    def __init__(self, model: nn.Module, layout: StageLayout, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.is_first = stage == 0
        self.is_last = stage == layout.num_stages - 1
        self.received: torch.Tensor | None = None
        self.sent: torch.Tensor | None = None
        self.started = False  # the stage's first block has run (the stand-ins check the model's order)
        self.view = _stage_view(model, layout, stage, self)

    def forward(self, *received: torch.Tensor, pipeline_inputs: tuple[Any, ...]) -> Any:
        self.received = None if self.is_first else received[0]
        self.started = False
        try:
            args, kwargs = pipeline_call(pipeline_inputs)
            output = self.view(*args, **kwargs)
            if self.is_last:  # a mapping (transformers' ModelOutput): its tensors, in order, as the schedule needs
                return (
                    tuple(v for v in output.values() if isinstance(v, torch.Tensor))
                    if isinstance(output, Mapping)
                    else output
                )
            sent, self.sent = self.sent, None
            if not isinstance(sent, torch.Tensor):
                raise ConfigError(
                    f"pipeline stage {self.stage}'s last block returned {type(sent).__name__}; blocks split into "
                    "pipeline stages must return the hidden state as one tensor"
                )
            return sent
        finally:
            self.received = None


class _Feed(nn.Module):
    """Stands in for what runs before a stage: returns the activation the stage received."""

    def __init__(self, runner: StageRunner, name: str) -> None:
        super().__init__()
        self.__dict__["runner"] = runner  # not a submodule: no cycle in the module tree
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.runner.started:
            raise ConfigError(
                f"a module registered before the blocks ({self.name}) runs after them in the model's forward, so "
                "pipeline stages cannot be cut by registration order; register it after the blocks (the order of "
                "the attributes in __init__), or give the model a forward that runs in that order"
            )
        return self.runner.received  # type: ignore[return-value]


class _Pass(nn.Module):
    """Stands in for what runs after a stage: returns its first argument (the hidden state) unchanged."""

    def __init__(self, runner: StageRunner, name: str) -> None:
        super().__init__()
        self.__dict__["runner"] = runner
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.runner.started:
            raise ConfigError(
                f"a module registered after the blocks ({self.name}) runs before them in the model's forward, so "
                "pipeline stages cannot be cut by registration order; register it before the blocks (the order of "
                "the attributes in __init__), or give the model a forward that runs in that order"
            )
        return args[0] if args else next(iter(kwargs.values()))


class _Boundary(nn.Module):
    """A stage's first and last block: the first marks that the blocks have started (stand-ins check the
    order) and, after the first stage, reads the received activation; the last's output is sent on."""

    def __init__(self, block: nn.Module, runner: StageRunner, enter: bool, leave: bool) -> None:
        super().__init__()
        self.block = block
        self.enter = enter
        self.leave = leave
        self.__dict__["runner"] = runner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.runner.started = True
        if self.enter:
            if args:
                args = (self.runner.received, *args[1:])
            else:
                first = next(iter(kwargs))
                kwargs = {**kwargs, first: self.runner.received}
        output = self.block(*args, **kwargs)
        if self.leave:
            self.runner.sent = output
        return output


class Absent(nn.Module):
    """Stands in, in the model a rank keeps, for a module that another pipeline stage owns."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{self.name} lives on another pipeline stage: under pipeline parallelism the model runs only through "
            "its schedule (the Trainer's steps and validation), not by calling it"
        )

    def extra_repr(self) -> str:
        return f"on another stage: {self.name}"


def _stage_view(model: nn.Module, layout: StageLayout, stage: int, runner: StageRunner) -> nn.Module:
    first, last = stage == 0, stage == layout.num_stages - 1
    own = layout.stages[stage]
    replacements: dict[str, nn.Module] = {}
    for name in layout.before:
        if not first:
            replacements[name] = _Feed(runner, name)
    for name in layout.after:
        if not last:
            replacements[name] = _Pass(runner, name)
    blocks = model.get_submodule(layout.blocks)
    for index in range(len(blocks)):
        name = f"{layout.blocks}.{index}"
        if index < own.start:
            replacements[name] = _Feed(runner, name)
        elif index >= own.stop:
            replacements[name] = _Pass(runner, name)
        elif index == own.start or index == own.stop - 1:
            enter, leave = index == own.start and not first, index == own.stop - 1 and not last
            replacements[name] = _Boundary(blocks[index], runner, enter, leave)
    view = view_with(model, replacements)
    if not first:  # the parameters held beside the blocks: stand-ins, and not among the view's parameters
        for parameter in layout.parameters:
            path, _, leaf = parameter.rpartition(".")
            container = view.get_submodule(path)
            assert container is not model.get_submodule(path), "the modules on the path to the blocks are copied"
            held = container._parameters[leaf]
            container.__dict__["_parameters"] = {k: v for k, v in container._parameters.items() if k != leaf}
            meta = torch.empty(held.shape, dtype=held.dtype, device="meta") if held is not None else None
            container.__dict__[leaf] = ParameterStandIn(runner, parameter, meta)
    return view


def view_with(module: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``module`` in which the submodules named in ``replacements`` are replaced; only the
    modules on the paths to them are copied (shallowly), everything else is shared with ``module``. The
    copies share their parameters and buffers dicts with the originals: what replaces a tensor in one
    (FSDP, initialisation, ``.to()``) is seen by the other."""
    if "" in replacements:
        return replacements[""]
    if not replacements:
        return module
    copied = copy.copy(module)
    shared = ("_parameters", "_buffers")
    copied.__dict__.update(
        {
            key: type(value)(value)
            for key, value in module.__dict__.items()
            if isinstance(value, dict) and key not in shared
        }
    )
    by_child: dict[str, dict[str, nn.Module]] = {}
    for name, replacement in replacements.items():
        child, _, rest = name.partition(".")
        by_child.setdefault(child, {})[rest] = replacement
    for child, inner in by_child.items():
        copied._modules[child] = view_with(module._modules[child], inner)  # type: ignore[arg-type]
    return copied


def keep_only(model: nn.Module, owned: set[str], layout: StageLayout) -> None:
    """Replace, in ``model`` itself, the pieces and blocks this rank's stages do not own by ``Absent``, and
    the parameters held beside the blocks (the first stage's) by ``None``."""
    for parameter in layout.parameters:
        if parameter not in owned:
            path, _, leaf = parameter.rpartition(".")
            model.get_submodule(path)._parameters[leaf] = None
    blocks = model.get_submodule(layout.blocks)
    names = [*layout.before, *(f"{layout.blocks}.{i}" for i in range(len(blocks))), *layout.after]
    for name in names:
        if name not in owned:
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent)._modules[child] = Absent(name)
