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


def rng_tensors() -> dict[str, "torch.Tensor"]:
    """This process's torch random-number states as tensors (CPU, and each CUDA device)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{index}"] = state
    return states


def restore_rng(states: dict[str, "torch.Tensor"]) -> None:
    torch.set_rng_state(states["cpu"])
    for key, state in states.items():
        if key.startswith("cuda") and torch.cuda.is_available() and int(key[4:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(state, int(key[4:]))
