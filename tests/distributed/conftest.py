"""Set-up shared by the distributed tests: DeepSpeed's ops checked, reference runs made once a session."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.distributed.runner import assert_ok, run_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built() -> None:
    """DeepSpeed's C++ ops are built by ``scripts/setup.sh``, not by a test: fail at once, naming the
    fix, when they are missing (a build inside a test eats its timeout)."""
    if importlib.util.find_spec("deepspeed") is None:
        return
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from build_deepspeed_ops import missing_ops
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    missing = missing_ops()
    if missing:
        pytest.exit(
            f"DeepSpeed's ops {missing} are not built: run `bash scripts/setup.sh` (or "
            "`python scripts/build_deepspeed_ops.py`) once, then the tests",
            returncode=1,
        )


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Callable[..., Any]:
    """``reference_run(script, *args)``: the result of ``run_script(script, ..., *args)``, run once per
    session for each distinct command and shared by every module that compares against it."""
    cache: dict[tuple[str, ...], Any] = {}

    def get(script: str, *args: str) -> Any:
        key = (script, *args)
        if key not in cache:
            out = tmp_path_factory.mktemp("reference")
            cache[key] = assert_ok(run_script(script, out, *args)).result()
        return copy.deepcopy(cache[key])

    return get
