"""Callbacks: code that runs at fixed points of the Trainer's loop."""

from shardtrain.callbacks.base import Callback
from shardtrain.callbacks.checkpoint import ModelCheckpoint
from shardtrain.callbacks.early_stopping import EarlyStopping
from shardtrain.callbacks.lr_monitor import LearningRateMonitor
from shardtrain.callbacks.model_summary import ModelSummary, RichModelSummary
from shardtrain.callbacks.progress import ProgressBar
from shardtrain.callbacks.stragglers import StragglerMonitor
from shardtrain.callbacks.summary import RunSummary
from shardtrain.callbacks.throughput import ThroughputMonitor

__all__ = [
    "Callback",
    "EarlyStopping",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "RichModelSummary",
    "ProgressBar",
    "RunSummary",
    "StragglerMonitor",
    "ThroughputMonitor",
]
