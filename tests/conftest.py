"""Shared test set-up: the repository root on sys.path (for ``examples``), one thread per process,
and the two tiers.

``python -m pytest tests`` (the README's command) runs the **fast tier**: every unit test, and the
distributed tests marked ``fast`` (the strategy contract suite and one short multi-process run per
strategy and per parallel layout), in at most 10 minutes on a 2-core machine.
``python -m pytest tests --full`` runs every test (CI runs both). Naming test files or test ids
on the command line runs what they name, whatever its tier.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

UNIT = Path(__file__).resolve().parent / "unit"
FULL_SUITE_COMMAND = "python -m pytest tests --full"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full",
        action="store_true",
        help="run the full suite (every test), not only the fast tier",
    )


def _names_files(config: pytest.Config) -> bool:
    """True when the command line names test files or test ids rather than directories."""
    return any(Path(arg.split("::")[0]).is_file() for arg in config.args)


def _in_fast_tier(item: pytest.Item) -> bool:
    return UNIT in Path(item.path).parents or item.get_closest_marker("fast") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full") or _names_files(config):
        return
    kept = [item for item in items if _in_fast_tier(item)]
    left_out = [item for item in items if not _in_fast_tier(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
    config.stash[_TIER] = (len(kept), len(kept) + len(left_out))


_TIER = pytest.StashKey[tuple]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _TIER in config.stash:
        kept, total = config.stash[_TIER]
        terminalreporter.write_line(
            f"fast tier: {kept} of {total} tests; the full suite is `{FULL_SUITE_COMMAND}`", bold=True
        )
