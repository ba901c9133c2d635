"""``<checkpoints>/last``: a file naming the newest committed checkpoint, ``ckpt_path="last"``, and the committed
checkpoints beside it to fall back on."""

from __future__ import annotations

import json
import os
from pathlib import Path

LAST = "last"


def point_last_at(directory: Path, target: Path) -> None:
    """Atomically make ``<directory>/last`` name ``target`` (relative when inside the directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = os.path.relpath(target.resolve(), directory.resolve())
    temporary = directory / f".{LAST}.tmp"
    temporary.write_text(name)
    os.replace(temporary, directory / LAST)


def resolve_checkpoint(ckpt_path: str | os.PathLike, checkpoint_dir: Path | None = None) -> Path | None:
    """The checkpoint ``ckpt_path`` names: a directory or weights file as given; a ``last`` pointer
    file, what it names; ``"last"``, what ``<checkpoint_dir>/last`` names, or None before any save."""
    path = Path(ckpt_path)
    if path.name == LAST and path.is_file():  # the pointer file itself
        return path.parent / path.read_text().strip()
    if str(ckpt_path) != LAST or checkpoint_dir is None:
        return path
    pointer = checkpoint_dir / LAST
    if not pointer.is_file():
        return None
    return checkpoint_dir / pointer.read_text().strip()


def other_checkpoints(damaged: Path, *directories: Path) -> list[Path]:
    """The committed checkpoints (directories with a readable ``meta.json``) in ``damaged``'s directory and in
    ``directories``, but ``damaged``, newest first: by the global step they saved, then by time."""
    found: dict[Path, tuple[int, float]] = {}
    for directory in (damaged.parent, *directories):
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            meta = entry / "meta.json"
            if entry.resolve() == damaged.resolve() or entry.name.startswith(".") or not meta.is_file():
                continue
            try:
                step = json.loads(meta.read_text())["state"]["loop"]["global_step"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # damaged too, or not a Trainer's checkpoint
            found[entry.resolve()] = (int(step), meta.stat().st_mtime)
    return sorted(found, key=lambda path: found[path], reverse=True)
