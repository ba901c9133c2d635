"""Callbacks: code that runs at fixed points of the Trainer's loop."""

from shardtrain.callbacks.base import Callback
from shardtrain.callbacks.checkpoint import ModelCheckpoint
from shardtrain.callbacks.progress import ProgressBar
from shardtrain.callbacks.summary import RunSummary
from shardtrain.callbacks.throughput import ThroughputMonitor

__all__ = ["Callback", "ModelCheckpoint", "ProgressBar", "RunSummary", "ThroughputMonitor"]
