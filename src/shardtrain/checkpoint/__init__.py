"""Saving and loading training state: sharded DCP directories, and single full-state files."""

from shardtrain.checkpoint.full_state import read_state_file, write_state_file
from shardtrain.checkpoint.sharded import FORMAT_VERSION, PendingSave, load_sharded, read_meta, save_sharded, save_sharded_async, saved_keys

__all__ = ["FORMAT_VERSION", "PendingSave", "save_sharded_async", "load_sharded", "read_meta", "read_state_file", "save_sharded", "saved_keys", "write_state_file"]
