"""Seeding every source of randomness a training run uses."""

from __future__ import annotations

import os
import random

import torch


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy (when installed) and torch on every device, and export ``PL_GLOBAL_SEED``-style ``SHARDTRAIN_SEED``."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    os.environ["SHARDTRAIN_SEED"] = str(seed)
    return seed
