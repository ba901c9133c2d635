"""Seeding every source of randomness a training run uses."""

from __future__ import annotations

import logging
import os
import random
import warnings

import torch


def seed_everything(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python, NumPy (when installed) and torch on every device; returns the seed (Lightning's ``seed_everything``).

    ``seed=None`` reads ``PL_GLOBAL_SEED`` (0 when unset, with a warning). Exports ``PL_GLOBAL_SEED`` (the
    Trainer's DistributedSampler shuffles with it) and ``PL_SEED_WORKERS``: with ``workers=True`` the Trainer
    gives loader workers :func:`worker_init_function` so that each worker of each rank draws its own numbers.
    """
    if seed is None:
        from_env = os.environ.get("PL_GLOBAL_SEED")
        if from_env is None:
            seed = 0
            if verbose:
                warnings.warn("No seed found, seed set to 0", stacklevel=2)
        else:
            try:
                seed = int(from_env)
            except ValueError:
                raise ValueError(f"Invalid seed specified via PL_GLOBAL_SEED: {from_env!r}") from None
    seed = int(seed)
    if not -(2**32) < seed < 2**32:  # what NumPy accepts (its seed must fit in 32 bits, sign aside)
        raise ValueError(f"{seed} is not in bounds, numpy accepts from {-(2**32) + 1} to {2**32 - 1}")
    if verbose:
        logging.getLogger("shardtrain").info("Seed set to %d", seed)
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    os.environ["SHARDTRAIN_SEED"] = str(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    return seed


def global_seed(default: int = 0) -> int:
    """The seed ``seed_everything`` exported (``PL_GLOBAL_SEED``), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def worker_init_function(worker_id: int, rank: int = 0) -> None:
    """Seed a DataLoader worker from its process seed, its id and the rank, as Lightning's
    ``pl_worker_init_function`` does (same numbers), so no two workers on any rank repeat each other."""
    base_seed = torch.initial_seed() - worker_id  # torch gave each worker base + worker_id
    seeds = _seed_sequence(base_seed, worker_id, rank, count=4)
    torch.manual_seed(seeds[0])
    random.seed((seeds[1] << 32) | seeds[2])
    try:
        import numpy

        numpy.random.seed(numpy.random.SeedSequence([base_seed, worker_id, rank]).generate_state(4))
    except ImportError:
        pass


def _seed_sequence(base_seed: int, worker_id: int, rank: int, count: int) -> list[int]:
    """``count`` 64-bit seeds: the three numbers mixed by MurmurHash3's finaliser, then drawn by Knuth's LCG."""
    mask = (1 << 64) - 1
    state = (base_seed << 32) | (worker_id << 16) | rank
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        state ^= state >> 33
        state = (state * multiplier) & mask
    state ^= state >> 33
    seeds = []
    for _ in range(count):
        state = (state * 6364136223846793005 + 1) & mask
        seeds.append(state)
    return seeds


def seed_workers_requested() -> bool:
    """Whether ``seed_everything(..., workers=True)`` asked for seeded loader workers."""
    return bool(int(os.environ.get("PL_SEED_WORKERS", 0)))


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
