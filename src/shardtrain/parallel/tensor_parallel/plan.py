"""Tensor-parallel plans: which submodules are split between tensor-parallel ranks, and how.

A plan maps module-name patterns to styles. A pattern is a dotted module path in which each
part is matched against child names with ``fnmatch`` (``"blocks.*.attn.qkv"``: ``*`` stands for
one part, such as a block index), exactly as ``torch.distributed.tensor.parallel.parallelize_module``
matches its plan keys. A style is a ``ParallelStyle`` object or one of the names below, which are
the names Hugging Face transformers' ``base_model_tp_plan`` uses, so a plan can be written in YAML:

=========================================  ====================================================
name                                       PyTorch style
=========================================  ====================================================
``colwise``                                ``ColwiseParallel()``: output features split, output
                                           stays split (feeds a ``rowwise`` layer)
``rowwise``                                ``RowwiseParallel()``: input features split, output
                                           summed over the ranks (all-reduce)
``colwise_rep``, ``colwise_gather_output`` ``ColwiseParallel(output_layouts=Replicate())``
``rowwise_rep``, ``rowwise_split_input``   ``RowwiseParallel(input_layouts=Replicate())``
``embedding_rowwise``                      ``RowwiseParallel(input_layouts=Replicate())`` on an
                                           ``nn.Embedding``: the vocabulary split
``embedding_colwise``                      ``ColwiseParallel(output_layouts=Replicate())`` on an
                                           ``nn.Embedding``: the embedding dimension split
``sequence_parallel``                      ``SequenceParallel()`` (PyTorch's meaning: the input
                                           arrives split along the sequence; norms, dropout)
=========================================  ====================================================

Sequence parallelism (Megatron's, as torchtitan lays it out) keeps the activations between the
split layers split along the sequence (dimension 1) rather than whole on every rank. These names
write such a plan (the GPT example's ``sequence_parallel_tp_plan`` uses them):

=========================================  ====================================================
name                                       PyTorch style
=========================================  ====================================================
``split_sequence``                         ``PrepareModuleInput(Replicate() -> Shard(1))``: the
                                           module's input is cut along the sequence
``gather_sequence``                        ``PrepareModuleInput(Shard(1) -> Replicate())``: the
                                           module's input is gathered whole (all-gather)
``rowwise_sequence``                       ``RowwiseParallel(output_layouts=Shard(1))``: the sum
                                           arrives split along the sequence (reduce-scatter)
``colwise_rep_sequence``                   ``ColwiseParallel(input_layouts=Shard(1),
                                           output_layouts=Replicate())``: the output layer of a
                                           sequence-parallel model
``embedding_rowwise_sequence``             ``RowwiseParallel(input_layouts=Replicate(),
                                           output_layouts=Shard(1))`` on an ``nn.Embedding``
=========================================  ====================================================

Every style is PyTorch's own (``torch.distributed.tensor.parallel``); nothing here shards a
tensor by hand. Where a plan comes from (``find_plan``), the first that applies: the strategy's
``tp_plan`` option (patterns relative to the ``TrainModule``); a Hugging Face model's
``config.base_model_tp_plan`` with its class's ``_tp_plan`` (relative to the HF model); a
``tp_plan`` attribute of any submodule, such as the GPT example's (relative to that submodule).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable, Mapping

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from shardtrain.errors import ConfigError
from shardtrain.parallel.adapters import adapter_tensor_parallel, is_adapter_layer
from shardtrain.parallel.materialize import shared_parameters

log = logging.getLogger(__name__)

#: Style names -> a factory of the PyTorch style (a new object per module).
STYLES: dict[str, Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_colwise": lambda: ColwiseParallel(output_layouts=Replicate()),
    "sequence_parallel": SequenceParallel,
    "split_sequence": lambda: PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
    ),
    "gather_sequence": lambda: PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
    ),
    "rowwise_sequence": lambda: RowwiseParallel(output_layouts=Shard(1)),
    "colwise_rep_sequence": lambda: ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    "embedding_rowwise_sequence": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
}

#: Style names transformers uses that have no PyTorch style with the same meaning in training.
UNSUPPORTED_STYLES = {
    "local": "local (unsharded) computation inside a gathered region",
    "local_colwise": "local shards without DTensor",
    "local_rowwise": "local shards without DTensor",
    "local_packed_rowwise": "packed local shards",
    "gather": "an all-reduce outside autograd (inference only)",
    "packed_colwise": "fused gate/up projections split in two halves",
    "packed_rowwise": "fused gate/up projections split in two halves",
    "replicate": "parameters replicated as DTensors",
    "replicated_with_grad_allreduce": "replicated parameters whose gradients are all-reduced",
    "all_reduce": "an all-reduce of a module's output",
    "grouped_gemm": "mixture-of-experts weights",
    "ep_router": "expert parallelism",
    "megamoe_router": "expert parallelism",
    "moe_tp_experts": "mixture-of-experts weights",
    "megamoe_experts": "mixture-of-experts weights",
    "moe_identity_expert": "mixture-of-experts weights",
    "mla_kv_a_proj": "multi-head latent attention",
}

#: Attribute names of head counts in model configs (GPT-style, Llama-style, Hugging Face).
HEAD_COUNT_NAMES = ("n_head", "n_heads", "num_attention_heads", "num_heads")
KV_HEAD_COUNT_NAMES = ("n_kv_head", "n_kv_heads", "num_key_value_heads", "num_kv_heads")

Plan = Mapping[str, "str | ParallelStyle"]


@dataclass(frozen=True, slots=True)
class FoundPlan:
    """A plan and where it applies: ``patterns`` are relative to ``root``; ``source`` says where it came from."""

    root: nn.Module
    patterns: dict[str, str | ParallelStyle]
    source: str


def check_plan(plan: Plan, where: str = "tp_plan") -> dict[str, str | ParallelStyle]:
    """``plan`` as a dict, after checking that every key is a pattern and every value a known style.

    Raises ``ConfigError`` naming the bad entry; needs no model, so it runs before any process starts.
    """
    if not isinstance(plan, Mapping):
        raise ConfigError(
            f"{where} must be a mapping of module-name patterns to styles, such as "
            f"{{'blocks.*.attn.qkv': 'colwise'}}; got {type(plan).__name__}"
        )
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not pattern or any(not part for part in pattern.split(".")):
            raise ConfigError(f"{where}: {pattern!r} is not a module-name pattern (dotted names, '*' for any one part)")
        make_style(style, f"{where}[{pattern!r}]")
    return dict(plan)


def make_style(style: str | ParallelStyle, where: str) -> ParallelStyle:
    """The PyTorch ``ParallelStyle`` for a style name (or the style object itself)."""
    if isinstance(style, ParallelStyle):
        return style
    if not isinstance(style, str):
        raise ConfigError(f"{where}: a style is a name or a ParallelStyle, got {type(style).__name__}")
    name = style.strip().lower()
    if name in STYLES:
        return STYLES[name]()
    if name in UNSUPPORTED_STYLES:
        raise ConfigError(
            f"{where}: style {style!r} ({UNSUPPORTED_STYLES[name]}) is a transformers style shardtrain does not "
            f"support; use one of {', '.join(STYLES)}, or parallelise that module in configure_model()"
        )
    raise ConfigError(f"{where}: unknown tensor-parallel style {style!r}; choose one of {', '.join(STYLES)}")


def matching_modules(root: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule of ``root`` that ``pattern`` names (``parallelize_module``'s matching)."""
    found: list[tuple[str, nn.Module]] = [("", root)]
    for part in pattern.split("."):
        found = [
            (f"{prefix}.{name}" if prefix else name, child)
            for prefix, module in found
            for name, child in module.named_children()
            if fnmatchcase(name, part)
        ]
    return found


def find_plan(module: nn.Module, option: Plan | None, sequence_parallel: bool = False) -> FoundPlan | None:
    """The plan for ``module``: the ``tp_plan`` option, a Hugging Face model's own, or a submodule's ``tp_plan``.

    With ``sequence_parallel``, the model's sequence-parallel plan instead: a submodule's
    ``sequence_parallel_tp_plan`` (Hugging Face models ship none)."""
    if option is not None:
        return FoundPlan(module, check_plan(option), "the strategy's tp_plan option")
    attribute = "sequence_parallel_tp_plan" if sequence_parallel else "tp_plan"
    if not sequence_parallel:
        for submodule in module.modules():
            hf_plan = _hugging_face_plan(submodule)
            if hf_plan:
                return FoundPlan(submodule, hf_plan, f"{type(submodule).__name__}'s Hugging Face tp plan")
    for submodule in module.modules():
        declared = getattr(submodule, attribute, None)
        if isinstance(declared, Mapping) and declared:
            where = f"{type(submodule).__name__}.{attribute}"
            return FoundPlan(submodule, check_plan(declared, where), where)
    return None


def _hugging_face_plan(module: nn.Module) -> dict[str, Any] | None:
    """transformers' plan of a ``PreTrainedModel``: the one it merged when built (transformers 5: the
    config's ``base_model_tp_plan`` under the base model's prefix, the class's ``_tp_plan`` for the
    LM head, the embedding), else the same merge done here."""
    config = vars(module).get("config")  # its own: a wrapper forwarding attributes (peft's PeftModel) is not it
    base_plan = getattr(config, "base_model_tp_plan", None)
    if not isinstance(base_plan, Mapping) or not base_plan or not hasattr(module, "base_model_prefix"):
        return None
    merged = vars(module).get("_tp_plan")
    if isinstance(merged, Mapping) and merged:
        return dict(merged)
    prefix = module.base_model_prefix
    inside = isinstance(getattr(module, prefix, None), nn.Module) if prefix else False
    plan = {f"{prefix}.{key}" if inside else key: style for key, style in base_plan.items()}
    for key, style in (getattr(type(module), "_tp_plan", None) or {}).items():
        plan.setdefault(key, style)  # the class's own entries (the LM head)
    return plan


def check_head_counts(module: nn.Module, tensor_parallel_size: int) -> None:
    """Every head count in the configs of ``module`` and its submodules must divide by the TP degree,
    so that each tensor-parallel rank holds whole heads; raises ``ConfigError`` naming the numbers."""
    if tensor_parallel_size == 1:
        return
    seen: set[int] = set()
    for submodule in module.modules():
        config = getattr(submodule, "config", None)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        for attribute in (*HEAD_COUNT_NAMES, *KV_HEAD_COUNT_NAMES):
            count = getattr(config, attribute, None)
            if isinstance(count, int) and not isinstance(count, bool) and count % tensor_parallel_size:
                divisors = [n for n in range(1, count + 1) if count % n == 0]
                raise ConfigError(
                    f"{type(config).__name__}.{attribute} = {count} is not divisible by tensor_parallel_size="
                    f"{tensor_parallel_size}: each tensor-parallel rank must hold whole heads; choose a "
                    f"tensor_parallel_size that divides {count} ({', '.join(map(str, divisors))})"
                )


def is_tensor_parallel(module: nn.Module) -> bool:
    """Whether ``module`` already has DTensor parameters (it was parallelised in ``configure_model()``)."""
    return any(isinstance(param, DTensor) for param in module.parameters())


def plan_targets(found: FoundPlan) -> list[tuple[str, nn.Module, ParallelStyle]]:
    """``(name, module, style)`` for every module the plan names. Raises ``ConfigError`` for a pattern
    that matches no module, for a module that two patterns name, and for a column- or row-wise split
    of a module that is not an ``nn.Linear`` or ``nn.Embedding`` (PyTorch's styles split only those)."""
    targets: dict[int, tuple[str, str, nn.Module, ParallelStyle]] = {}
    for pattern, style in found.patterns.items():
        matched = matching_modules(found.root, pattern)
        if not matched:
            raise ConfigError(
                f"tensor-parallel plan entry {pattern!r} (from {found.source}) matches no module of "
                f"{type(found.root).__name__}; its modules are named like: {_example_names(found.root)}"
            )
        for name, module in matched:
            if id(module) in targets:
                raise ConfigError(
                    f"module {name!r} is named by two tensor-parallel plan entries, {targets[id(module)][0]!r} and "
                    f"{pattern!r} (from {found.source}); give each module one style"
                )
            made = make_style(style, f"{found.source}[{pattern!r}]")
            if is_adapter_layer(module):  # peft's LoRA wrapping the layer the plan names: split as it would be
                for part, inner, inner_style in adapter_tensor_parallel(name, module, made):
                    targets[id(inner)] = (pattern, part, inner, inner_style)
                continue
            if type(made) in (ColwiseParallel, RowwiseParallel) and not isinstance(module, (nn.Linear, nn.Embedding)):
                raise ConfigError(
                    f"tensor-parallel plan entry {pattern!r} (from {found.source}) gives {name!r}, a "
                    f"{type(module).__name__}, the style {type(made).__name__}, which splits only nn.Linear and "
                    f"nn.Embedding; name the Linear or Embedding layers inside it instead ({name}.<child>; its "
                    f"submodules: {_example_names(module, 6) or 'none'})"
                )
            targets[id(module)] = (pattern, name, module, made)
    return [(name, module, style) for _, name, module, style in targets.values()]


def with_split_logits(found: FoundPlan) -> FoundPlan:
    """``found`` with its output layer's logits left split by vocabulary, for ``loss_parallel``.

    The output layer is the one entry whose ``ColwiseParallel`` gathers its output (``colwise_rep``);
    it becomes ``ColwiseParallel(use_local_output=False)``: its output stays a DTensor sharded on
    the last dimension, which ``loss_parallel``'s cross-entropy reads. Raises ``ConfigError`` when
    the plan has no such entry, or several."""
    gathered = [
        pattern
        for pattern, style in found.patterns.items()
        if isinstance(made := make_style(style, f"{found.source}[{pattern!r}]"), ColwiseParallel)
        and isinstance(made.output_layouts[0], Replicate)
    ]
    if len(gathered) != 1:
        raise ConfigError(
            f"loss_parallel needs the output layer in the tensor-parallel plan ({found.source}) as the one entry "
            f"that gathers its output ('colwise_rep'); found {len(gathered)}: {gathered or 'none'}. Give the output "
            "layer 'colwise_rep', or leave loss_parallel off"
        )
    (head,) = gathered
    arriving = make_style(found.patterns[head], head).input_layouts[0]  # whole, or split along the sequence
    patterns = {**found.patterns, head: ColwiseParallel(input_layouts=arriving, use_local_output=False)}
    return FoundPlan(found.root, patterns, f"{found.source}, with {head!r} left split for loss_parallel")


def apply_plan(found: FoundPlan, tp_mesh: Any) -> list[str]:
    """Parallelise the modules ``found`` names over ``tp_mesh`` with PyTorch's ``parallelize_module``;
    returns their names. Parameters tied before (an embedding and its output layer) stay tied."""
    targets = plan_targets(found)
    ties = shared_parameters(found.root)
    for name, module, style in targets:
        parallelize_module(module, tp_mesh, style)
        _refuse_uneven_splits(name, module, style, tp_mesh.size())
    _tie_again(ties, found.source)
    log.info("tensor parallel over %d ranks (%s): %d modules", tp_mesh.size(), found.source, len(targets))
    return [name for name, _, _ in targets]


def sequence_splits(style: ParallelStyle) -> list[tuple[int, int]]:
    """``(argument index, dimension)`` of each whole input that ``style`` cuts into shards (the
    sequence, in a sequence-parallel plan): ``PrepareModuleInput`` from ``Replicate`` to ``Shard``, and
    ``RowwiseParallel`` whose summed output is scattered along a dimension of its input."""
    if isinstance(style, PrepareModuleInput):
        pairs = zip(style.input_layouts or (), style.desired_input_layouts or ())
        return [
            (i, want.dim)
            for i, (have, want) in enumerate(pairs)
            if isinstance(have, Replicate) and isinstance(want, Shard)
        ]
    if (
        isinstance(style, RowwiseParallel)
        and isinstance(style.output_layouts[0], Shard)
        and style.output_layouts[0].dim >= 0
    ):
        return [(0, style.output_layouts[0].dim)]
    return []


def _refuse_uneven_splits(name: str, module: nn.Module, style: ParallelStyle, ranks: int) -> None:
    """A check before ``style`` cuts an input: the dimension must divide by the ranks (the collectives of
    uneven shards fail or hang), with an error naming the fix instead. Host-side shapes only: no sync."""
    splits = sequence_splits(style)
    if not splits:
        return

    def check(_module: nn.Module, args: tuple[Any, ...]) -> None:
        for index, dim in splits:
            if index < len(args) and hasattr(args[index], "shape") and args[index].shape[dim] % ranks:
                raise ValueError(
                    f"{name!r} splits dimension {dim} of its input (length {args[index].shape[dim]}, shape "
                    f"{tuple(args[index].shape)}) between {ranks} tensor-parallel ranks (sequence parallelism), so "
                    f"it must divide by {ranks}: make sequences a multiple of {ranks} long (pad them), or leave "
                    "sequence parallelism off"
                )

    module.register_forward_pre_hook(check, prepend=True)


def _example_names(root: nn.Module, count: int = 12) -> str:
    names = [name for name, _ in root.named_modules() if name]
    shown = ", ".join(names[:count])
    return shown + (f", ... ({len(names)} in all)" if len(names) > count else "")


def _tie_again(ties: list[list[tuple[nn.Module, str]]], source: str) -> None:
    """``parallelize_module`` gives each module a new parameter; make the owners of a tied one share again.

    Possible only where every owner's style laid the tensor out the same way (the vocabulary-split
    embedding and output layer: both ``Shard(0)``)."""
    for owners in ties:
        params = [module._parameters[name] for module, name in owners]
        first = params[0]
        if all(param is first for param in params):
            continue
        layouts = {_layout(param) for param in params}
        if len(layouts) > 1:
            described = ", ".join(f"{type(m).__name__}.{n}: {_layout(p)}" for (m, n), p in zip(owners, params))
            raise ConfigError(
                f"tied parameters were split differently by the tensor-parallel plan ({source}): {described}; give "
                "the tied modules styles that split the shared weight alike (embedding_rowwise with colwise or "
                "colwise_rep), or leave both out of the plan"
            )
        chosen = next((param for param in params if isinstance(param, DTensor)), first)
        for module, name in owners:
            module._parameters[name] = chosen


def _layout(param: Any) -> str:
    if isinstance(param, DTensor):
        return f"{tuple(param.placements)} on mesh {tuple(param.device_mesh.mesh_dim_names or ())}"
    return "not split"
