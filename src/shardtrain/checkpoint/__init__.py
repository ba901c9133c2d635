"""Saving and loading training state: sharded DCP directories, and consolidated safetensors."""

from shardtrain.checkpoint.sharded import (
    FORMAT_VERSION,
    PendingSave,
    load_sharded,
    read_meta,
    save_sharded,
    save_sharded_async,
    saved_keys,
    verify_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "PendingSave",
    "load_sharded",
    "read_meta",
    "save_sharded",
    "save_sharded_async",
    "saved_keys",
    "verify_checkpoint",
]
