"""The shape the architecture guide promises (docs/architecture.md), checked on the source with ``ast``.

The import graph counts every import of a shardtrain module, at module level and inside functions
(a deferred import hides a circle, it does not remove one), but not ``if TYPE_CHECKING:`` blocks.
Importing ``a.b.c`` from outside package ``a.b`` also runs ``a/b/__init__.py``: that is an edge too.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "shardtrain"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(inner) for inner in ast.walk(node))
    return hidden


def imported(name: str) -> set[str]:
    """The shardtrain modules that importing ``name`` runs imports of (directly)."""
    known = modules()
    tree = ast.parse(known[name].read_text())
    hidden = _type_checking_nodes(tree)
    package = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    edges: set[str] = set()
    for target in targets:
        if target not in known:
            continue
        edges.add(target)
        parts = target.split(".")
        for end in range(2, len(parts)):  # the packages above it run first, unless this module is inside them
            parent = ".".join(parts[:end])
            if not (name == parent or name.startswith(parent + ".")):
                edges.add(parent)
    edges.discard(name)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_has_no_cycles() -> None:
    graph = {name: imported(name) for name in modules()}
    assert len(graph) > 80  # every module was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found_and_named() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _importers(package: str) -> dict[str, set[str]]:
    return {name: imported(name) for name in modules() if name == package or name.startswith(package + ".")}


def _reaching(edges: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(t for t in edges if any(t == f or t.startswith(f + ".") for f in forbidden))


def test_the_techniques_import_no_strategy_engine_or_trainer() -> None:
    forbidden = ("shardtrain.strategies", "shardtrain.trainer", "shardtrain.engine")
    found = {
        name: bad for name, edges in _importers("shardtrain.parallel").items() if (bad := _reaching(edges, forbidden))
    }
    assert len(_importers("shardtrain.parallel")) >= 10
    assert not found, f"parallel/ is the techniques, below every strategy: {found}"


def test_the_trainer_talks_only_to_the_engine() -> None:
    forbidden = ("shardtrain.strategies", "shardtrain.parallel")
    found = {
        name: bad for name, edges in _importers("shardtrain.trainer").items() if (bad := _reaching(edges, forbidden))
    }
    assert len(_importers("shardtrain.trainer")) >= 5
    assert not found, f"the Trainer goes through the Engine, not the strategy or the techniques: {found}"


def test_no_trainer_file_calls_the_strategy() -> None:
    trainer_files = sorted((SOURCE / "trainer").glob("*.py"))
    assert len(trainer_files) >= 5
    calls = re.compile(r"\bstrategy\.\w+\s*\(")  # e.g. self.strategy.load_module_state_dict(...)
    for path in trainer_files:
        found = [line.strip() for line in path.read_text().splitlines() if calls.search(line)]
        assert not found, f"trainer/{path.name} calls the strategy (go through the Engine): {found}"
