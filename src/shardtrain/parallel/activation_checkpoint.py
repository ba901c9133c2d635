"""Activation checkpointing applied from a policy, with no change to the model's code.

Each selected module's ``forward`` is replaced, on that instance only, by a non-reentrant
``torch.utils.checkpoint.checkpoint`` of the original: its activations are dropped after the
forward pass and recomputed in the backward pass. Parameter names do not change (no wrapper
module), so state dicts and checkpoints are the same with and without it. Used by every
strategy; apply it before sharding.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from torch import nn
from torch.utils.checkpoint import checkpoint

from shardtrain.flops import recomputation_context
from shardtrain.parallel.policy import ModulePolicy, describe, select_modules

log = logging.getLogger(__name__)


def apply_activation_checkpointing(root: nn.Module, policy: ModulePolicy) -> list[nn.Module]:
    """Checkpoint every submodule of ``root`` that ``policy`` selects; returns them."""
    selected = select_modules(root, policy, "activation_checkpointing_policy")
    for module in selected:
        if getattr(module, "_shardtrain_checkpointed", False):
            continue
        original = module.forward
        module.forward = functools.partial(checkpoint, original, use_reentrant=False, context_fn=_contexts)  # type: ignore[method-assign]
        module._shardtrain_checkpointed = True
    log.info("activation checkpointing on %s", describe(selected))
    return selected


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Nothing around the forward pass; the recomputation is marked so FLOP counting can tell it apart."""
    return contextlib.nullcontext(), recomputation_context()
