"""The Lightning oracle: modules written against ``lightning.pytorch``, run as written under Lightning and,
ported by changing their imports only, under shardtrain; the tests compare what the two did.

A module file here is written the way a Lightning user writes it (``import lightning.pytorch as L``,
``from lightning.pytorch.callbacks import ModelCheckpoint``, ``LightningModule``, ...), and defines
``experiment(root: str, **trainer_kwargs) -> dict``: it builds the Trainer with ``trainer_kwargs``, runs
what it tests and returns plain JSON-able records (hook calls, logged rows, results, weights).
``load(name, "lightning")`` imports it as written; ``load(name, "shardtrain")`` imports it after
:func:`port_source` (the import map of docs/lightning.md, applied as a find-and-replace, as a user
would). Sibling files imported as ``from tests.lightning_port.NAME import ...`` are ported the same way.

Multi-process runs: ``tests/distributed/scripts/lightning_port.py`` runs one module's ``experiment`` under
torchrun (Lightning detects torchrun's environment, as shardtrain does) and writes each rank's records.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
FLAVOURS = ("lightning", "shardtrain")

#: The import map: (Lightning's name, shardtrain's), applied in this order as whole-word replacements.
IMPORT_MAP: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.callbacks", "shardtrain.callbacks"),
    ("lightning.pytorch.loggers", "shardtrain.loggers"),
    ("lightning.pytorch.utilities", "shardtrain.utilities"),
    ("lightning.pytorch", "shardtrain"),
    ("pytorch_lightning", "shardtrain"),
    ("LightningDataModule", "DataModule"),
    ("LightningModule", "TrainModule"),
)

_SIBLING = re.compile(r"\btests\.lightning_port\.(\w+)\b")


def port_source(source: str) -> str:
    """``source`` with Lightning's names replaced by shardtrain's (the import map, nothing else)."""
    for lightning_name, shardtrain_name in IMPORT_MAP:
        before = r"(?<![\w.])" if "." in lightning_name else r"(?<!\w)"  # a module path; a class name after "L."
        source = re.sub(rf"{before}{re.escape(lightning_name)}\b", shardtrain_name, source)
    return source


def load(name: str, flavour: str) -> ModuleType:
    """The module file ``tests/lightning_port/<name>.py``, as written (``"lightning"``) or ported (``"shardtrain"``)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    module_name = f"_{flavour}_port_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    source = (HERE / f"{name}.py").read_text()
    for sibling in sorted(set(_SIBLING.findall(source))):
        load(sibling, flavour)
    source = _SIBLING.sub(lambda match: f"_{flavour}_port_{match.group(1)}", source)
    if flavour == "shardtrain":
        source = port_source(source)
    spec = importlib.util.spec_from_loader(module_name, loader=None, origin=str(HERE / f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(HERE / f"{name}.py")
    sys.modules[module_name] = module
    try:
        exec(compile(source, f"<{flavour}: tests/lightning_port/{name}.py>", "exec"), module.__dict__)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def run(name: str, flavour: str, root: str | Path, **trainer_kwargs: Any) -> dict[str, Any]:
    """``experiment(root, **trainer_kwargs)`` of module file ``name`` in ``flavour``, on the CPU, quietly."""
    quiet = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
    return load(name, flavour).experiment(str(root), **{**quiet, **trainer_kwargs})
