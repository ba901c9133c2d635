"""Checksums of a sharded checkpoint's files: recorded at save, verified before a load trusts them.

Every rank checksums the files it wrote (DCP names them ``__<rank>_<n>.distcp``; rank 0 also writes
``.metadata``) into a small ``.checksums_rank<r>.json`` beside them; the rank that commits merges those
into ``meta.json`` (``"checksums"``: each file's size and CRC-32), checksums any file no rank claimed,
and records a CRC-32 of ``meta.json``'s own content (``"meta_crc32"``). Files are read back from the page
cache right after they were written; an asynchronous save does this in its background thread.

``verify`` compares what is on disk with the record: a missing file, a size that differs (a truncated
copy, a full disk) or a CRC that differs (a flipped bit) is named. Under a process group the ranks split
the files between them and share what they found (one collective per load). CRC-32 finds accidental
damage; it is not a defence against a file altered on purpose.

A checkpoint saved before checksums were recorded has none: it loads, with a warning that it was not
verified.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable

import torch.distributed as dist

CHECKSUMS = "checksums"
META_CRC = "meta_crc32"
_SIDECAR = re.compile(r"^\.checksums_rank(\d+)\.json$")
_CHUNK = 8 * 2**20


def file_checksum(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "crc32": "<8 hex digits>"}`` of one file, read in 8 MiB pieces."""
    crc, size = 0, 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while read := file.readinto(buffer):
            crc = zlib.crc32(view[:read], crc)  # zlib releases the GIL on large buffers
            size += read
    return {"bytes": size, "crc32": f"{crc:08x}"}


def record_rank_checksums(staging: Path, rank: int, *, only_process: bool) -> None:
    """After this rank's files are written into ``staging``: its checksums, in its sidecar file.
    ``only_process``: a save without a process group, whose one process wrote every file."""
    mine = [
        path
        for path in staging.iterdir()
        if path.is_file()
        and not _SIDECAR.match(path.name)
        and (only_process or path.name.startswith(f"__{rank}_") or (rank == 0 and path.name == ".metadata"))
    ]
    sums = {path.name: file_checksum(path) for path in sorted(mine)}
    sidecar = staging / f".checksums_rank{rank}.json"
    temporary = sidecar.with_name(sidecar.name + ".tmp")
    temporary.write_text(json.dumps(sums))
    os.replace(temporary, sidecar)


def collect_checksums(staging: Path, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """On the committing rank, once every rank has written its files and sidecar: every file's checksum (the
    sidecars merged and removed; a file no sidecar names is checksummed here)."""
    sums: dict[str, dict[str, Any]] = {}
    for sidecar in sorted(staging.iterdir()):
        if _SIDECAR.match(sidecar.name):
            sums.update(json.loads(sidecar.read_text()))
            sidecar.unlink()
    skipped = set(exclude)
    for path in sorted(staging.iterdir()):
        if path.is_file() and path.name not in sums and path.name not in skipped and not path.name.endswith(".tmp"):
            sums[path.name] = file_checksum(path)
    return dict(sorted(sums.items()))


def meta_crc(meta: dict[str, Any]) -> str:
    """CRC-32 of ``meta.json``'s content without its own ``meta_crc32`` (canonical JSON: sorted keys)."""
    content = {key: value for key, value in meta.items() if key != META_CRC}
    return f"{zlib.crc32(json.dumps(content, sort_keys=True).encode()):08x}"


def problems_with(directory: Path, recorded: dict[str, dict[str, Any]], names: Iterable[str]) -> list[str]:
    """What is wrong with the files ``names`` of ``directory`` against their recorded checksums."""
    found = []
    for name in names:
        expected = recorded[name]
        path = directory / name
        if not path.is_file():
            found.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            found.append(f"{name}: {size} bytes, {expected['bytes']} were written (truncated or cut short)")
            continue
        actual = file_checksum(path)["crc32"]
        if actual != expected["crc32"]:
            found.append(f"{name}: CRC-32 {actual}, {expected['crc32']} was written (its content changed on disk)")
    return found


def verify(directory: Path, meta: dict[str, Any], *, distributed: bool = True) -> list[str]:
    """Every recorded file of the checkpoint at ``directory`` checked; returns what is wrong (empty: all good).

    With ``distributed`` and an initialised process group, every rank must call this: each checks its share
    of the files and the ranks exchange their findings (``all_gather_object``), so all return the same list.
    A checkpoint without checksums returns no problems (see ``has_checksums``)."""
    recorded = meta.get(CHECKSUMS)
    if not recorded:
        return []
    names = sorted(recorded)
    if distributed and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = problems_with(directory, recorded, names[rank::world])
        everyone: list[list[str] | None] = [None] * world
        dist.all_gather_object(everyone, mine)
        return sorted(problem for part in everyone for problem in part or [])
    return problems_with(directory, recorded, names)


def has_checksums(meta: dict[str, Any]) -> bool:
    return bool(meta.get(CHECKSUMS))


def warn_unverified(directory: Path) -> None:
    warnings.warn(
        f"checkpoint {directory} records no checksums (saved by a shardtrain before they were recorded): loaded "
        "without verifying its files; save it again to record them",
        stacklevel=3,
    )
