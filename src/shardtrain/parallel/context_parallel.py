"""Context parallelism: each sequence split over the ``cp`` ranks of the mesh, attention computed as a ring.

Built on PyTorch's ``torch.distributed.tensor.experimental.context_parallel``: inside ``split_sequences(...)``
the step's sequence tensors hold this rank's part (PyTorch's head-tail load balancing for causal attention:
with ``2 x cp`` chunks, rank ``r`` holds chunks ``r`` and ``2cp - 1 - r``), and every
``F.scaled_dot_product_attention`` call is PyTorch's ring attention over the ``cp`` group (keys and values
passed round the ring, partial results merged by their log-sum-exp). ``sequence_positions`` gives the global
positions of the tokens a rank holds, for position embeddings.

One piece of glue lives here: PyTorch's ring attention handles the CUDA attention kernels (flash, efficient,
cuDNN) but not CPU's ``aten._scaled_dot_product_flash_attention_for_cpu``, whose DTensor dispatch raises
"does not have a sharding strategy registered". ``_CPU_RING_ATTENTION`` runs that op and its backward through
PyTorch's own ring templates (``_templated_ring_attention`` and its backward), so the same code runs on gloo
for the tests. Drop it when PyTorch handles CPU (tests/unit/test_context_parallel.py says when).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from shardtrain.errors import ConfigError

aten = torch.ops.aten

#: The global positions of this rank's tokens during a context-parallel step (``split_sequences``).
_positions: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("cp_positions", default=None)


def sequence_positions(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The positions, in the whole sequence, of the ``length`` tokens this rank holds: ``arange(length)``, or
    during a context-parallel step the positions of this rank's chunks (not contiguous under load balancing).

    A model with position embeddings (learned or rotary) computes them from these instead of ``arange``."""
    positions = _positions.get()
    if positions is None:
        return torch.arange(length, device=device)
    if positions.numel() != length:
        raise ValueError(
            f"sequence_positions({length}) in a context-parallel step whose rank holds {positions.numel()} tokens: "
            "pass the length of the sequence tensors the model was given (their dimension 1)"
        )
    return positions if device is None else positions.to(device)


def in_split_step() -> bool:
    """Whether a ``split_sequences`` block is running (a context-parallel step's forward and backward)."""
    return _positions.get() is not None


@contextlib.contextmanager
def split_sequences(mesh: DeviceMesh, inputs: Sequence[tuple[torch.Tensor, int]]) -> Iterator[None]:
    """Within the block, each tensor of ``inputs`` (``(tensor, sequence dim)``, split in place) holds this rank's
    part of its sequence, ``sequence_positions`` their positions, and attention runs as a ring over ``mesh``
    (the ``cp`` dimension). The tensors stay split afterwards. Forward and backward must both run inside."""
    from torch.distributed.tensor.experimental import context_parallel

    register_cpu_ring_attention()
    tensors = [tensor for tensor, _ in inputs]
    dims = [dim for _, dim in inputs]
    length = tensors[0].shape[dims[0]]
    positions = torch.arange(length, device=tensors[0].device)
    with context_parallel(
        mesh, buffers=[*tensors, positions], buffer_seq_dims=[*dims, 0], no_restore_buffers={*tensors, positions}
    ):
        ring = F.scaled_dot_product_attention  # PyTorch's ring, installed by context_parallel
        F.scaled_dot_product_attention = functools.partial(_checked_attention, ring)
        token = _positions.set(positions)
        try:
            yield
        finally:
            _positions.reset(token)
            F.scaled_dot_product_attention = ring


def _checked_attention(ring: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The ring, after the checks that name the fix for what it cannot run (rather than an error from deep inside
    DTensor dispatch): causal attention without a mask, and on CPU without dropout (the CPU kernel's path)."""
    named = dict(zip(("key", "value", "attn_mask", "dropout_p", "is_causal"), args)) | kwargs
    if named.get("attn_mask") is not None or not named.get("is_causal", False):
        raise ConfigError(
            "context parallelism runs causal attention without a mask: call scaled_dot_product_attention with "
            "is_causal=True and no attn_mask"
        )
    if named.get("dropout_p", 0.0) and query.device.type == "cpu":
        raise ConfigError(
            "attention dropout under context parallelism on CPU: PyTorch runs it outside the kernel the ring "
            "handles; set the attention's dropout_p to 0 (dropout elsewhere in the model is fine)"
        )
    return ring(query, *args, **kwargs)


# ---------------------------------------------------------------- CPU glue (drop when PyTorch handles CPU)


def _arguments(op: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by their schema names."""
    schema = op._schema.arguments
    named = {argument.name: argument.default_value for argument in schema if argument.has_default_value()}
    named.update({argument.name: value for argument, value in zip(schema, args)})
    named.update(kwargs)
    return named


def _cpu_ring_forward(op_call: Any, args: tuple, kwargs: dict) -> object:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._context_parallel._attention import _templated_ring_attention

    named = _arguments(op_call, args, kwargs)
    query, key, value = named.pop("query"), named.pop("key"), named.pop("value")
    mesh = query.device_mesh
    out, logsumexp = _templated_ring_attention(
        mesh.get_group(),
        2,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        query.to_local(),
        key.to_local(),
        value.to_local(),
        is_causal=named["is_causal"],
        dropout_p=named["dropout_p"],
        scale=named["scale"],
    )
    placements = [Shard(2)]
    return (
        DTensor.from_local(out, mesh, placements, run_check=False),
        DTensor.from_local(logsumexp, mesh, placements, run_check=False),
    )


def _cpu_ring_backward(op_call: Any, args: tuple, kwargs: dict) -> object:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _templated_ring_attention_backward,
    )

    named = _arguments(op_call, args, kwargs)
    local = {name: named[name].to_local() for name in ("grad_out", "query", "key", "value", "out", "logsumexp")}
    mesh = named["query"].device_mesh
    grads = _templated_ring_attention_backward(
        mesh.get_group(),
        2,
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        grad_out_name="grad_out",
        is_causal=named["is_causal"],
        dropout_p=named["dropout_p"],
        scale=named["scale"],
        **local,
    )
    placements = [Shard(2)]
    return tuple(DTensor.from_local(grad, mesh, placements, run_check=False) for grad in grads[:3])


_CPU_RING_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_ring_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _cpu_ring_backward,
}


def register_cpu_ring_attention() -> None:
    """Add the CPU attention op to the handlers PyTorch's context parallelism installs on entering its context
    (idempotent; ``split_sequences`` calls it; a loop of your own on CPU calls it once)."""
    from torch.distributed.tensor.experimental._context_parallel import _attention

    for op, handler in _CPU_RING_ATTENTION.items():
        _attention.custom_ops.setdefault(op, handler)


def sequence_inputs(module: Any, batch: Any, cp: int) -> list[tuple[torch.Tensor, int]]:
    """The batch's sequence tensors, as ``module.context_parallel_inputs(batch)`` names them, checked: one length
    along their sequence dims, which ``2 x cp`` chunks divide (the load balancing of causal attention)."""
    check_contract(module, cp)
    inputs = list(module.context_parallel_inputs(batch))
    if not inputs or not all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor) for item in inputs
    ):
        raise ConfigError(
            f"{type(module).__name__}.context_parallel_inputs(batch) must return a non-empty list of "
            "(tensor, sequence dim) pairs, e.g. [(tokens, 1), (targets, 1)]"
        )
    lengths = {tensor.shape[dim] for tensor, dim in inputs}
    if len(lengths) != 1:
        raise ConfigError(
            f"the tensors context_parallel_inputs(batch) names have sequences of different lengths {sorted(lengths)}"
            "; name only the tensors that run along the sequence, with their sequence dims"
        )
    (length,) = lengths
    if length % (2 * cp):
        raise ConfigError(
            f"a sequence of {length} does not split into 2 x context_parallel_size = {2 * cp} equal chunks "
            f"(each rank holds two, for causal attention's load balance); use sequences of a multiple of {2 * cp}"
        )
    return inputs


def check_contract(module: Any, cp: int) -> None:
    """Before any process group: a module trained with ``cp > 1`` says which batch tensors run along the sequence."""
    if not callable(getattr(module, "context_parallel_inputs", None)):
        raise ConfigError(
            f"context_parallel_size={cp} splits each sequence over {cp} ranks, but {type(module).__name__} does not "
            "say which batch tensors run along it: define context_parallel_inputs(batch) returning "
            "[(tensor, sequence dim), ...], e.g. [(tokens, 1), (targets, 1)] (see docs/context_parallel.md)"
        )
