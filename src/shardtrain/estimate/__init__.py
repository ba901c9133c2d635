"""Memory per layout, before anything is allocated: ``footprint`` (the model measured on the meta
device), ``table`` (every registered strategy's row: ``estimate_memory``), ``auto`` (``strategy="auto"``
chosen from it). The formulas themselves live beside their strategies (``Strategy.estimate_memory``)."""

from shardtrain.estimate.table import MemoryEstimate, estimate_memory

__all__ = ["MemoryEstimate", "estimate_memory"]
