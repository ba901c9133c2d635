"""Loggers: where metrics and hyperparameters are written (rank 0 only), with Lightning's classes and names.

``WandbLogger`` and ``MLFlowLogger`` import their packages when made (``pip install 'shardtrain[wandb]'``,
``'shardtrain[mlflow]'``): importing this package never needs them.
"""

from shardtrain.loggers.base import DummyExperiment, Logger, rank_zero_experiment
from shardtrain.loggers.csv_logger import CSVLogger
from shardtrain.loggers.mlflow_logger import MLFlowLogger
from shardtrain.loggers.tensorboard_logger import TensorBoardLogger
from shardtrain.loggers.wandb_logger import WandbLogger

__all__ = [
    "Logger",
    "CSVLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "MLFlowLogger",
    "DummyExperiment",
    "rank_zero_experiment",
]
