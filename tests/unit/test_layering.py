"""The layering the architecture guide promises, checked on the source (docs/architecture.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src" / "shardtrain"
MAX_LINES = 400


@pytest.mark.parametrize("path", sorted(SOURCE.rglob("*.py")), ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_module_is_longer_than_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SOURCE)} has {lines} lines; split it by concern"


def test_no_trainer_file_calls_the_strategy() -> None:
    trainer_files = sorted(SOURCE.glob("trainer*.py"))
    assert len(trainer_files) >= 4
    calls = re.compile(r"\bstrategy\.\w+\s*\(")  # e.g. self.strategy.load_module_state_dict(...)
    for path in trainer_files:
        found = [line.strip() for line in path.read_text().splitlines() if calls.search(line)]
        assert not found, f"{path.name} calls the strategy (go through the Engine): {found}"
