"""DeepSpeed ZeRO as a strategy: ``strategy`` (the class), ``config`` (the DeepSpeed config from its
options, a user's config and the loop's settings), ``runtime`` (its engine and precision), ``state``
(checkpoints keyed by parameter names), ``memory`` (its memory formula). DeepSpeed itself is
imported only when a run uses it."""

from shardtrain.strategies.deepspeed.strategy import DeepSpeedStrategy

__all__ = ["DeepSpeedStrategy"]
