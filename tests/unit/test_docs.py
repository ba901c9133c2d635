"""The documents that state what exists stay true of the code: the strategy table in
docs/strategies.md against the registry, the README's status table against what is registered,
and the README's set-up commands against CI.

And the code in every document (docs/*.md, README.md) against the code: each ```python block
compiles and every shardtrain name it imports or uses exists (so do `shardtrain.x.y` names in the
text); every strategy name given to ``strategy=``, ``--strategy.name`` or a YAML ``strategy:`` is
registered; every ``Trainer(...)`` keyword and ``trainer:`` key is a ``TrainerArguments`` field;
every flag of a ``shardtrain <command>`` is accepted by that command's own parser.

A ```python block that is a fragment, not a program, may be marked by the line
``<!-- not-python -->`` right before its fence (invisible in the rendered page): it is then not
compiled. Use it sparingly; a fragment can usually be made whole with ``...``."""

import argparse
import ast
import dataclasses
import importlib
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import shardtrain
from shardtrain import StrategyError, cli, config
from shardtrain.strategies.registry import strategy_description, strategy_factory
from shardtrain.trainer.arguments import TrainerArguments

ROOT = Path(__file__).resolve().parents[2]
#: Accepted by ``strategy=`` without being registered: it picks a registered strategy.
NOT_REGISTERED = {"auto"}


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading``, header and separator rows left out."""
    section = markdown.split(f"\n{heading}\n", 1)[1]
    rows = []
    lines = section.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|") or line.startswith("#")), len(lines))
    for line in lines[start:]:
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


# --------------------------------------------------------------------------------------------
# Every document's code against the code: the Python examples compile and import what exists,
# the strategy names are registered, the Trainer arguments are declared, and the command-line
# flags are accepted by the command they are given to.

DOCUMENTS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
#: Written on the line before a ```python fence whose block is a fragment, not a program.
NOT_PYTHON = "<!-- not-python -->"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", ""}
SHARDTRAIN_COMMANDS = ("fit", "validate", "print-config", "consolidate", "estimate")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is (``docs/x.md:12``), its language and its dedented text."""

    where: str
    language: str
    text: str
    opted_out: bool


def _doc_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = re.fullmatch(r"( *)```(\w*)\s*", lines[index])
        if not opening:
            index += 1
            continue
        indent, language, start = len(opening[1]), opening[2], index
        index += 1
        body = []
        while index < len(lines) and not re.fullmatch(r" *```\s*", lines[index]):
            line = lines[index]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            index += 1
        before = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        blocks.append(Block(f"{_doc_name(path)}:{start + 1}", language, "\n".join(body) + "\n", before == NOT_PYTHON))
        index += 1
    return blocks


def _all_blocks(*languages: str) -> list[Block]:
    return [block for path in DOCUMENTS for block in _blocks(path) if block.language in languages]


def _prose(path: Path) -> str:
    """The document without its fenced blocks."""
    return re.sub(r"^ *```\w*\n.*?^ *```\s*$", "", path.read_text(), flags=re.M | re.S)


def _inline_code(path: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _prose(path))


def _python_blocks() -> list[Block]:
    return _all_blocks("python", "py")


def _parsed_python_blocks() -> list[tuple[Block, ast.AST]]:
    """The Python blocks that parse (test_python_blocks_compile reports the others), with their trees."""
    parsed = []
    for block in _python_blocks():
        try:
            parsed.append((block, ast.parse(block.text)))
        except SyntaxError:
            pass
    return parsed


# --- 1. Python blocks compile, and the shardtrain names they use exist ---------------------


def _resolve(dotted: str) -> None:
    """Import ``shardtrain.a.b`` as far as it is a module, then getattr the rest; raise if missing."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[:depth]))


def _shardtrain_references(tree: ast.AST) -> set[str]:
    """``from shardtrain.x import A`` → shardtrain.x.A; ``import shardtrain.x``; ``shardtrain.x.y`` chains."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "shardtrain":
            found |= {f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*"}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "shardtrain"}
        elif isinstance(node, ast.Attribute):
            chain = _attribute_chain(node)
            if chain and chain.split(".")[0] == "shardtrain":
                found.add(chain)
    return found


def _attribute_chain(node: ast.AST) -> str | None:
    """``a.b.c`` for an attribute chain on a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def test_python_blocks_compile():
    failures = []
    for block in _python_blocks():
        if not block.opted_out:
            try:
                compile(block.text, block.where, "exec")
            except SyntaxError as error:
                failures.append(f"{block.where}: {error.msg} at line {error.lineno}: {error.text!r}")
    assert not failures, f"```python blocks that do not compile (mark fragments with {NOT_PYTHON}):\n" + "\n".join(
        failures
    )


def test_opt_out_is_used_sparingly():
    opted_out = [block.where for block in _python_blocks() if block.opted_out]
    assert len(opted_out) <= 5, f"too many ```python blocks marked {NOT_PYTHON}: {opted_out}"


def test_shardtrain_names_in_python_blocks_exist():
    failures = []
    for block, tree in _parsed_python_blocks():
        for name in sorted(_shardtrain_references(tree)):
            try:
                _resolve(name)
            except (ImportError, AttributeError) as error:
                failures.append(f"{block.where}: {name} ({error})")
    assert not failures, "shardtrain names in the docs' Python that do not exist:\n" + "\n".join(failures)


def test_shardtrain_names_in_prose_exist():
    """Inline code such as `shardtrain.hf.from_pretrained(path)` names something that exists."""
    failures = []
    for path in DOCUMENTS:
        for span in _inline_code(path):
            for name in re.findall(r"(?<![\w./-])shardtrain(?:\.[A-Za-z_]\w*)+", span):
                try:
                    _resolve(name)
                except (ImportError, AttributeError) as error:
                    failures.append(f"{_doc_name(path)}: `{span}` ({error})")
    assert not failures, "shardtrain names in the docs' text that do not exist:\n" + "\n".join(failures)


# --- 2. Strategy names are registered -------------------------------------------------------


def _strategy_names_in(text: str) -> set[str]:
    """``strategy="x"`` (not ``sharding_strategy=``), ``--strategy.name x``, YAML ``strategy: x``/``name: x``."""
    names = set(re.findall(r"(?<![\w.])strategy\s*=\s*[\"']([^\"']+)[\"']", text))
    names |= set(re.findall(r"--strategy\.name[ =]+([\w-]+)", text))
    names |= set(re.findall(r"^\s*strategy:\s*([A-Za-z_]\w*)\s*(?:#.*)?$", text, flags=re.M))
    names |= set(re.findall(r"^\s*strategy:\s*\n\s+name:\s*([A-Za-z_]\w*)", text, flags=re.M))
    names |= set(re.findall(r"^\s*strategy:\s*\{[^}]*\bname:\s*([A-Za-z_]\w*)", text, flags=re.M))
    return names


def _registered_in_docs() -> set[str]:
    """Names the docs themselves register as examples (``register_strategy("my_pipeline", ...)``)."""
    text = "".join(path.read_text() for path in DOCUMENTS)
    return set(re.findall(r"register_strategy\(\s*[\"'](\w+)[\"']", text))


def test_strategy_names_in_the_docs_are_registered():
    allowed = {*shardtrain.available_strategies(), *NOT_REGISTERED, *_registered_in_docs()}
    failures = []
    for path in DOCUMENTS:
        for name in sorted(_strategy_names_in(path.read_text())):
            if name.lower() not in allowed:
                failures.append(f"{_doc_name(path)}: strategy {name!r}")
    rows = _table((ROOT / "docs/strategies.md").read_text(), "## What exists today")
    failures += [f"docs/strategies.md's table: {name!r}" for row in rows for name in _names(row[0]) - allowed]
    assert not failures, f"strategy names that are not registered ({', '.join(sorted(allowed))}):\n" + "\n".join(
        failures
    )


# --- 3. Trainer arguments are declared ------------------------------------------------------


def _trainer_arguments() -> set[str]:
    return {field.name for field in dataclasses.fields(TrainerArguments)}


def _trainer_keywords(tree: ast.AST) -> set[str]:
    """Keyword arguments of every ``Trainer(...)`` / ``shardtrain.Trainer(...)`` call."""
    return {
        keyword.arg
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and (_attribute_chain(node.func) or "").split(".")[-1] == "Trainer"
        for keyword in node.keywords
        if keyword.arg is not None
    }


def _yaml_trainer_keys(block: Block) -> set[str]:
    """Keys under ``trainer:`` in a YAML block (read by the YAML parser; a fragment is read by indentation)."""
    try:
        document = yaml.safe_load(block.text)
    except yaml.YAMLError:
        document = None
    if isinstance(document, dict):
        return set(document.get("trainer") or {}) if isinstance(document.get("trainer"), dict) else set()
    section = re.search(r"^trainer:\s*\n((?:[ \t]+.*\n|\s*\n)*)", block.text, flags=re.M)
    return set(re.findall(r"^  (\w+):", section[1], flags=re.M)) if section else set()


def test_trainer_arguments_in_the_docs_exist():
    declared, failures = _trainer_arguments(), []
    for block, tree in _parsed_python_blocks():
        failures += [f"{block.where}: Trainer({keyword}=...)" for keyword in _trainer_keywords(tree) - declared]
    for block in _all_blocks("yaml", "yml"):
        failures += [f"{block.where}: trainer.{key} in YAML" for key in _yaml_trainer_keys(block) - declared]
    for name in re.findall(r"^\| `trainer\.(\w+)`", (ROOT / "docs/configuration.md").read_text(), flags=re.M):
        if name not in declared:
            failures.append(f"docs/configuration.md's table: trainer.{name}")
    for cells in _table((ROOT / "docs/trainer.md").read_text(), "## Arguments"):
        failures += [f"docs/trainer.md's table: {name}" for name in _names(cells[0]) - declared]
    assert not failures, "Trainer arguments not declared in TrainerArguments:\n" + "\n".join(failures)


# --- 4. Command-line flags are accepted ------------------------------------------------------


def _shardtrain_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, command, words after it)`` for every ``shardtrain <command> ...`` in shell blocks and
    inline code; an inline ``--trainer.x 1`` / ``--strategy.x y`` on its own counts as ``shardtrain fit``'s."""
    sources = [(b.where, b.text) for b in _all_blocks(*SHELL_LANGUAGES)]
    sources += [(_doc_name(path), span) for path in DOCUMENTS for span in _inline_code(path)]
    found = []
    for where, text in sources:
        for line in text.replace("\\\n", " ").splitlines():
            if re.match(r"--(trainer|strategy)\.", line):
                line = "shardtrain fit " + line
            try:
                words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
            except ValueError:  # prose with an apostrophe, not a command
                continue
            for index, word in enumerate(words[:-1]):
                if word == "shardtrain" and words[index + 1] in SHARDTRAIN_COMMANDS:
                    arguments = itertools.takewhile(lambda w: w not in ("&&", "||", ";", "|"), words[index + 2 :])
                    found.append((where, words[index + 1], list(arguments)))
    return found


def _parser_built_by(command_function, argv: list[str]) -> argparse.ArgumentParser:
    """The argparse parser ``command_function`` builds inside itself, caught when it first parses."""

    class Caught(Exception):
        pass

    parsers = []

    def catch(parser, *args, **kwargs):
        parsers.append(parser)
        raise Caught

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(Caught):
            command_function(argv)
    return parsers[0]


def _strategy_option_accepted(option: str, strategy: str | None) -> bool:
    """``--strategy.<option>``: ``name``, or an option of the named strategy (of any, when none is named)."""
    if option == "name":
        return True
    candidates = [strategy] if strategy and strategy != "auto" else shardtrain.available_strategies()
    for name in candidates:
        try:
            config.check_strategy({"name": name, option: None})
            return True
        except StrategyError:
            pass
    return False


def _flag_problem(command: str, flag: str, words: list[str]) -> str | None:
    """Why ``shardtrain <command>`` would refuse ``flag``, or None."""
    if command == "consolidate":
        accepted = set(_parser_built_by(cli._consolidate, ["x", "y"])._option_string_actions)
        return None if flag in accepted else f"not one of {sorted(accepted)}"
    accepted = set(config.build_parser(command)._option_string_actions)
    if command == "estimate":
        accepted |= set(_parser_built_by(cli._estimate, [])._option_string_actions)
    else:
        accepted |= set(cli._node_parser(command)._option_string_actions)
    group, _, key = flag[2:].partition(".")
    if group == "trainer" and key:
        argument = key.split(".")[0].rstrip("+")
        return None if argument in _trainer_arguments() else f"{argument!r} is not a Trainer argument"
    if group == "strategy" and key:
        named = words[words.index("--strategy.name") + 1] if "--strategy.name" in words[:-1] else None
        if not _strategy_option_accepted(key, named):
            return f"strategy {named!r} does not take {key!r}" if named else f"no registered strategy takes {key!r}"
        return None
    if group in ("model", "data") and key:
        return None  # the options of the class named by class_path
    return None if flag in accepted else f"not one of {sorted(accepted)}"


def test_shardtrain_command_flags_are_accepted():
    commands = _shardtrain_commands()
    assert {command for _, command, _ in commands} >= {"fit", "consolidate", "estimate"}, commands
    failures = []
    for where, command, words in commands:
        for flag in (w.split("=", 1)[0] for w in words if w.startswith("--")):
            problem = _flag_problem(command, flag, words)
            if problem:
                failures.append(f"{where}: shardtrain {command} {flag}: {problem}")
    assert not failures, "flags the shardtrain commands do not accept:\n" + "\n".join(failures)
