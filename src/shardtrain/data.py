"""Data loaders for distributed runs: a ``DistributedSampler`` put in where one is needed, batches moved to the device."""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torch.utils._pytree import tree_map_only
from torch.utils.data.dataset import IterableDataset


def with_distributed_sampler(loader: DataLoader, world_size: int, rank: int, seed: int) -> DataLoader:
    """A copy of ``loader`` in which each rank reads its own 1/world_size of the samples.

    ``batch_size`` stays per process, as in Lightning: the global batch is ``batch_size * world_size``.
    Loaders that already carry a ``DistributedSampler``, iterable datasets and custom samplers are
    returned unchanged (the latter with a warning: sharding them is the user's job).
    """
    if world_size == 1 or isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, DistributedSampler):
        return loader
    if (
        not isinstance(loader.sampler, (RandomSampler, SequentialSampler))
        or type(loader.batch_sampler) is not BatchSampler
    ):
        warnings.warn(
            "the train/val DataLoader has a custom sampler; shardtrain did not insert a DistributedSampler, "
            "so make sure each rank reads different data",
            stacklevel=3,
        )
        return loader
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
        **({"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}),
    )


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in lists, tuples, namedtuples, dicts) on ``device``."""
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device, non_blocking=True), batch)


class DeviceDataLoader:
    """Iterates a loader and yields batches already on the device; ``set_epoch`` reshuffles per epoch."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield move_to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
