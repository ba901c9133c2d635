"""The documents that state what exists stay true of the code: the strategy table in
docs/strategies.md against the registry, the README's status table against what is registered,
and the README's set-up commands against CI."""

import re
from pathlib import Path

import shardtrain
from shardtrain.strategies.registry import strategy_description, strategy_factory

ROOT = Path(__file__).resolve().parents[2]
#: Accepted by ``strategy=`` without being registered: it picks a registered strategy.
NOT_REGISTERED = {"auto"}


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading``, header and separator rows left out."""
    section = markdown.split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section.lstrip("\n").splitlines():
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[2:]


def _names(cell: str) -> set[str]:
    """Strategy names written in code spans: `ddp`, `deepspeed_stage_3` (not options like `stage=3`)."""
    return {name for name in re.findall(r"`([^`]+)`", cell) if re.fullmatch(r"[a-z][a-z0-9_]*", name)}


def _mentions(text: str, word: str) -> bool:
    """``word`` in ``text`` as a whole name: `fsdp` in "FSDP2 (`fsdp`)", not in "fsdp_cpu_offload"."""
    return re.search(rf"(?<![a-z0-9_]){re.escape(word.lower())}(?![a-z_])", text.lower()) is not None


def _built_in() -> list[str]:
    """Registered names that ship with shardtrain (plug-ins from installed packages left out)."""
    return [n for n in shardtrain.available_strategies() if strategy_factory(n).__module__.startswith("shardtrain.")]


def _families() -> dict[str, str]:
    """Each built-in strategy class by its shortest registered name: single, ddp, fsdp, deepspeed."""
    families: dict[str, str] = {}
    for name in sorted(_built_in(), key=len):
        families.setdefault(strategy_factory(name).__name__, name)
    return families


def test_strategy_table_and_registry_name_the_same_strategies():
    rows = _table((ROOT / "docs/strategies.md").read_text(), "## What exists today")
    in_table = set().union(*(_names(row[0]) for row in rows))
    registered = set(shardtrain.available_strategies())
    assert set(_built_in()) - in_table == set(), "registered but missing from docs/strategies.md's table"
    assert in_table - registered == NOT_REGISTERED, "in docs/strategies.md's table but not registered"


def test_strategy_table_names_the_class_each_name_builds():
    for name_cell, class_cell, *_ in _table((ROOT / "docs/strategies.md").read_text(), "## What exists today"):
        written = re.match(r"`([A-Z]\w*)", class_cell)
        for name in _names(name_cell) - NOT_REGISTERED:
            if written:
                assert strategy_factory(name).__name__ == written[1], (name, class_cell)


def _status() -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in _table((ROOT / "README.md").read_text(), "## Status")]


def test_readme_status_names_every_strategy_family_as_done():
    done = " ".join(capability for capability, state in _status() if state.startswith("done"))
    for cls, word in _families().items():
        assert _mentions(done, word), f"the README's status table has no 'done' row for {word} ({cls})"


def test_readme_status_plans_nothing_that_exists():
    planned = [capability for capability, state in _status() if "planned" in state]
    descriptions = " / ".join(strategy_description(name) for name in shardtrain.available_strategies())
    for capability in planned:
        for word in [*shardtrain.available_strategies(), *_families().values()]:
            assert not _mentions(capability, word), f"README: {capability!r} is 'planned' but {word!r} is registered"
        # "Tensor parallelism" stays planned only while no registered strategy describes "tensor parallel".
        for phrase in re.split(r",| and ", re.sub(r"\(.*?\)|`", "", capability)):
            stem = re.sub(r"ism$", "", phrase.strip().lower())
            assert stem and stem not in descriptions.lower(), f"README: {capability!r} is 'planned' but exists"


def test_readme_set_up_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == [
        "bash scripts/setup.sh && shardtrain fit --config examples/gpt/gpt.yaml",
        "bash scripts/setup.sh && python -m pytest tests",
    ]
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert any(line.startswith(commands[1] + " ") or line == commands[1] for line in ci), "CI must run it literally"
    assert "bash scripts/check_plain_install.sh" in ci
    full_suite = "python -m pytest tests --full"
    assert any(line.startswith(full_suite) for line in ci), "CI must run the full suite"
    assert f"`{full_suite}`" in readme, "the README must give the full suite's command"
    for guide in ("docs/quickstart.md", "README.md"):
        assert "bash scripts/setup.sh" in (ROOT / guide).read_text()
