"""Saving and loading training state."""

from shardtrain.checkpoint.full_state import load_full_state, save_full_state

__all__ = ["save_full_state", "load_full_state"]
