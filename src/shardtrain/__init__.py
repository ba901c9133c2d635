"""shardtrain: train PyTorch models of any size on any number of devices, with one Trainer.

The public API is what this module exports; everything else may change between releases.
"""

from shardtrain.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RunSummary,
    StragglerMonitor,
    ThroughputMonitor,
)
from shardtrain.datamodule import DataModule
from shardtrain.engine import Engine
from shardtrain.errors import (
    CheckpointError,
    DamagedCheckpointError,
    ConfigError,
    LaunchError,
    MissingDependencyError,
    NonFiniteError,
    RankFailedError,
    ShardtrainError,
    StrategyError,
    TrainingStepError,
)
from shardtrain.estimate import MemoryEstimate, estimate_memory
from shardtrain.loggers import CSVLogger, Logger, TensorBoardLogger
from shardtrain.module import TrainModule
from shardtrain.parallel.context_parallel import sequence_positions
from shardtrain.precision import Precision
from shardtrain.preemption import EXIT_CODE_PREEMPTED, Preempted, Preemption
from shardtrain.seed import seed_everything
from shardtrain.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    available_strategies,
    register_strategy,
)
from shardtrain.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Trainer",
    "TrainModule",
    "DataModule",
    "Engine",
    "estimate_memory",
    "sequence_positions",
    "MemoryEstimate",
    "Strategy",
    "SingleDeviceStrategy",
    "DDPStrategy",
    "DeepSpeedStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
    "available_strategies",
    "register_strategy",
    "Precision",
    "Preemption",
    "Preempted",
    "EXIT_CODE_PREEMPTED",
    "Callback",
    "ProgressBar",
    "ModelCheckpoint",
    "EarlyStopping",
    "LearningRateMonitor",
    "StragglerMonitor",
    "ThroughputMonitor",
    "RunSummary",
    "Logger",
    "CSVLogger",
    "TensorBoardLogger",
    "seed_everything",
    "ShardtrainError",
    "ConfigError",
    "StrategyError",
    "LaunchError",
    "CheckpointError",
    "DamagedCheckpointError",
    "MissingDependencyError",
    "NonFiniteError",
    "RankFailedError",
    "TrainingStepError",
]
