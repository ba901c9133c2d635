"""Read DCP checkpoints without running code from them: every load path of shardtrain comes through here.

A DCP directory holds two kinds of pickle that PyTorch (2.13) opens with the full unpickler,
which runs any code a file names:

* ``.metadata``: ``FileSystemReader.read_metadata`` calls ``pickle.load``. Here it is read by
  ``_MetadataUnpickler``, which resolves only the globals DCP's metadata is made of (its
  dataclasses, ``torch.Size``, dtypes and layouts, ``pathlib`` paths) and refuses any other
  before importing its module, so nothing from the file runs.
* non-tensor entries (an optimizer's ``param_groups``: floats, tuples, names) stored as bytes:
  ``DefaultLoadPlanner.load_bytes`` calls ``torch.load(weights_only=False)``. Here
  ``SafeLoadPlanner`` reads them with ``weights_only=True``, PyTorch's restricted unpickler.

Tensors themselves DCP already reads with ``torch.load(weights_only=True)``. A file that asks for
anything else raises ``CheckpointError`` naming the file and what it asked for. Saving is
unchanged: the files are DCP's own format, so other DCP tools read them.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from shardtrain.errors import CheckpointError

METADATA_FILE = ".metadata"


def _qualified(obj: Any) -> tuple[str, str]:
    return obj.__module__, obj.__qualname__


#: The globals a DCP ``.metadata`` pickle may name, as (module, name): looked up from the objects
#: themselves, so a class that moves between torch releases is still found where it now lives.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    _qualified(obj)
    for obj in (
        dcp_metadata.Metadata,
        dcp_metadata.StorageMeta,
        dcp_metadata.MetadataIndex,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.TensorProperties,
        dcp_metadata._MEM_FORMAT_ENCODING,
        dcp_filesystem._StorageInfo,
        torch.Size,
        torch.serialization._get_layout,  # a dict lookup of a layout by its name
        pathlib.PurePath,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.Path,
        pathlib.PosixPath,
        pathlib.WindowsPath,
    )
) | {
    # The same classes under the module names older releases pickled them with.
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``_ALLOWED_GLOBALS`` and torch's dtypes and layouts.

    The check comes before any import, so a refused global's module is never loaded.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self._path} asks to run {module}.{name} when it is read; a DCP checkpoint's metadata holds "
            "only DCP's own classes, so this file was not written by DCP (or was altered) and is not loaded"
        )


def read_metadata(directory: str | os.PathLike, *, file_name: str = METADATA_FILE) -> dcp_metadata.Metadata:
    """The DCP metadata of the checkpoint in ``directory``, read without running code from it.

    Also checks that every data file it points at is a plain file name inside ``directory``.
    """
    path = Path(directory) / file_name
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle, path).load()
    except FileNotFoundError:
        raise CheckpointError(
            f"{Path(directory)} has no {file_name}: it is not a DCP checkpoint, or is incomplete"
        ) from None
    except CheckpointError:
        raise
    except Exception as error:  # truncated or otherwise unreadable
        raise CheckpointError(f"{path} cannot be read as DCP metadata ({type(error).__name__}: {error})") from error
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or relative != Path(relative).name or relative in ("", ".", ".."):
            raise CheckpointError(f"{path} points at {relative!r}, outside its checkpoint directory; not loaded")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata is read by ``read_metadata`` above (once, when made)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._directory = Path(path)
        self._metadata = read_metadata(self._directory)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        rank = kwargs.get("rank")
        metadata = (
            self._metadata if rank is None else read_metadata(self._directory, file_name=f"__{rank}{METADATA_FILE}")
        )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``torch.load(weights_only=True)``."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        super().__init__()
        self._directory = Path(directory) if directory is not None else None

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{self._file_of(read_item)} holds an entry ({read_item.dest_index.fqn}) that asks to run code when "
                f"it is read ({_refused_global(error)}); only plain values and tensors are loaded, so it is not"
            ) from error
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes puts the value back
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    def _file_of(self, read_item: Any) -> str:
        info = (self.metadata.storage_data or {}).get(read_item.storage_index) if self.metadata is not None else None
        name = getattr(info, "relative_path", "a data file")
        return str(self._directory / name) if self._directory is not None else name


def _refused_global(error: pickle.UnpicklingError) -> str:
    """The line of PyTorch's weights-only error that names what the file asked for."""
    lines = str(error).splitlines()
    line = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return line.split(" Please use")[0].rstrip(".")  # not PyTorch's advice on how to allow it


def load_tensors(state: dict[str, Any], directory: str | os.PathLike, *, no_dist: bool) -> None:
    """``dcp.load`` of ``state`` (filled in place) from ``directory`` through the safe reader and planner.

    A refusal on any rank is raised as that ``CheckpointError`` (DCP would wrap it in its own exception).
    """
    reader = SafeFileSystemReader(directory)
    with quiet_single_process(), unwrap_checkpoint_errors():
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(directory), no_dist=no_dist)


@contextlib.contextmanager
def unwrap_checkpoint_errors() -> Iterator[None]:
    """Re-raise a ``CheckpointError`` that DCP caught on some rank and wrapped in ``CheckpointException``."""
    try:
        yield
    except CheckpointException as wrapped:
        for error, _ in wrapped.failures.values():
            if isinstance(error, CheckpointError):
                raise CheckpointError(str(error)) from wrapped
        raise


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes' a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
