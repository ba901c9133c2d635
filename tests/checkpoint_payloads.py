"""Plant a payload that runs code when unpickled into a real checkpoint, the way an attacker would.

The payload's unpickling opens ``marker`` for writing (a stand-in for any code): if the file exists
after a load, code from the checkpoint ran. The rest of the checkpoint stays valid, so a reader that
unpickles freely loads it without a word (as PyTorch's ``FileSystemReader`` did before). The attacker
also records the altered files' checksums in ``meta.json`` (CRC-32 finds damage, it is no signature), so
the checksums pass and what stops the payload is the safe reader.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata


class Payload:
    """Unpickling this object calls ``open(marker, "w")``: the file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _read_metadata(checkpoint: Path):
    with open(checkpoint / ".metadata", "rb") as handle:
        return pickle.load(handle)  # the test's own, untouched checkpoint


def plant_in_metadata(checkpoint: Path, marker: Path) -> None:
    """Keep ``.metadata`` valid for DCP, with the payload inside its ``planner_data``."""
    metadata = _read_metadata(checkpoint)
    metadata.planner_data = {**(metadata.planner_data or {}), "payload": Payload(marker)}
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    rerecord_checksums(checkpoint)


def plant_in_bytes_entry(checkpoint: Path, marker: Path) -> str:
    """Point the first non-tensor entry (an optimizer's ``param_groups`` value) at a ``torch.save``d
    payload appended to its data file; returns that file's name."""
    metadata = _read_metadata(checkpoint)
    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    data_file = checkpoint / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as handle:
        handle.write(buffer.getvalue())
    info.offset, info.length = offset, len(buffer.getvalue())
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    rerecord_checksums(checkpoint)
    return info.relative_path


def rerecord_checksums(checkpoint: Path) -> None:
    """Record the files' current sizes and CRC-32s in ``meta.json`` (and its own CRC), as a save would."""
    from shardtrain.checkpoint.integrity import CHECKSUMS, META_CRC, file_checksum, meta_crc

    meta_path = checkpoint / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.pop(META_CRC, None)
    meta[CHECKSUMS] = {name: file_checksum(checkpoint / name) for name in meta.get(CHECKSUMS, {})}
    meta_path.write_text(json.dumps({**meta, META_CRC: meta_crc(meta)}))
