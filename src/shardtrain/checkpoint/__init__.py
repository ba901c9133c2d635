"""Saving and loading training state."""

from shardtrain.checkpoint.full_state import read_state_file, write_state_file

__all__ = ["read_state_file", "write_state_file"]
