"""``torch.compile`` per block: which options, and compiling the blocks FSDP does not wrap.

Blocks are compiled in place (``nn.Module.compile``), so parameter names do not change. Under FSDP,
``apply_fsdp`` compiles each unit just before sharding it, with the options from here.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn


def compile_options(compile: bool | dict[str, Any], *, tensor_parallel: bool = False) -> dict[str, Any] | None:
    """``torch.compile``'s options for a strategy's ``compile`` argument; None when it is off.

    The user's options, over ``dynamic=False`` under tensor parallelism: DTensor activations with
    symbolic shapes fail in sharding propagation (torch 2.13: "unhashable type: non-nested SymInt", a
    norm on a sequence-split DTensor); each new input shape compiles again instead.
    """
    if not compile:
        return None
    options = dict(compile) if isinstance(compile, dict) else {}
    if tensor_parallel:
        options.setdefault("dynamic", False)
    return options


def apply_compile(blocks: Sequence[nn.Module], options: dict[str, Any] | None) -> None:
    """Compile each of ``blocks`` in place with ``options`` (None: leave them as they are)."""
    if options is None:
        return
    for block in blocks:
        block.compile(**options)
