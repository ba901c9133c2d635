"""Loggers: where metrics are written (rank 0 only)."""

from shardtrain.loggers.base import Logger
from shardtrain.loggers.csv_logger import CSVLogger
from shardtrain.loggers.tensorboard_logger import TensorBoardLogger

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger"]
