"""The Engine: launch, set-up, the step, collectives and checkpoints; the layer for custom loops.

``engine`` (the class), ``wrapper`` (what ``setup`` returns: the module and optimizers routed through
the strategy), ``checkpoint`` (saving and loading the state of set-up modules), ``rank_agreement``
(every rank built the same model).
"""

from shardtrain.engine.engine import Engine

__all__ = ["Engine"]
