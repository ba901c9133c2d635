"""The Trainer: the loop (fit, validate, test, predict) over the Engine, which it alone talks to.

``trainer`` (the class and its loop), ``arguments`` (its arguments, shared with the CLI and YAML),
``checkpoint`` (resuming, the ``last`` pointer), ``validation``, ``metrics`` (what ``log`` collects),
``nonfinite`` (what a NaN loss does).
"""

from shardtrain.trainer.trainer import Trainer

__all__ = ["Trainer"]
