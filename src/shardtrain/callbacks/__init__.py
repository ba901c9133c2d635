"""Callbacks: code that runs at fixed points of the Trainer's loop."""

from shardtrain.callbacks.base import Callback
from shardtrain.callbacks.progress import ProgressBar

__all__ = ["Callback", "ProgressBar"]
