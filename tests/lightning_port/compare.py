"""Compare two runs' records: the same structure, numbers equal within a tolerance, names equal up to the
checkpoint file suffix (Lightning saves ``name.ckpt`` files, shardtrain sharded ``name`` directories)."""

from __future__ import annotations

import math
from typing import Any


def differences(ours: Any, theirs: Any, where: str = "", rel: float = 1e-4, abs_: float = 1e-5) -> list[str]:
    """Where ``ours`` and ``theirs`` differ (empty when they match)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        found = [f"{where}: keys {sorted(set(ours) ^ set(theirs))} in only one run"] if set(ours) != set(theirs) else []
        for key in sorted(set(ours) & set(theirs)):
            found += differences(ours[key], theirs[key], f"{where}.{key}", rel, abs_)
        return found
    if isinstance(theirs, (list, tuple)) and isinstance(ours, (list, tuple)):
        if len(ours) != len(theirs):
            return [f"{where}: {len(ours)} items, Lightning {len(theirs)}: {ours!r:.300} vs {theirs!r:.300}"]
        return [d for i, (a, b) in enumerate(zip(ours, theirs)) for d in differences(a, b, f"{where}[{i}]", rel, abs_)]
    if isinstance(theirs, float) or isinstance(ours, float):
        if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
            if math.isclose(ours, theirs, rel_tol=rel, abs_tol=abs_):
                return []
        return [f"{where}: {ours!r} vs Lightning {theirs!r}"]
    if isinstance(theirs, str) and isinstance(ours, str):
        return (
            [] if ours.removesuffix(".ckpt") == theirs.removesuffix(".ckpt") else [f"{where}: {ours!r} vs {theirs!r}"]
        )
    return [] if ours == theirs else [f"{where}: {ours!r:.300} vs Lightning {theirs!r:.300}"]


def assert_same(ours: Any, theirs: Any, **tolerance: float) -> None:
    found = differences(ours, theirs, **tolerance)
    assert not found, "shardtrain differs from Lightning:\n" + "\n".join(found[:40])
