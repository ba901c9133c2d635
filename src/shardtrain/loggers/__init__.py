"""Loggers: where metrics and hyperparameters are written (rank 0 only), with Lightning's classes and names."""

from shardtrain.loggers.base import DummyExperiment, Logger, rank_zero_experiment
from shardtrain.loggers.csv_logger import CSVLogger
from shardtrain.loggers.tensorboard_logger import TensorBoardLogger

__all__ = ["Logger", "CSVLogger", "TensorBoardLogger", "DummyExperiment", "rank_zero_experiment"]
