"""Set-up shared by the distributed tests."""

from __future__ import annotations

import importlib.util

import pytest

from tests.distributed.runner import assert_ok, run_script


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built(tmp_path_factory) -> dict | None:
    """DeepSpeed's C++ ops, built once before the first distributed test (seconds when already built).

    Returns the seconds each op took to build or load, or None without DeepSpeed.
    """
    if importlib.util.find_spec("deepspeed") is None:
        return None
    return assert_ok(
        run_script("build_deepspeed_ops.py", tmp_path_factory.mktemp("deepspeed_ops"), timeout=2400)
    ).result()
