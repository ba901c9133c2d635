"""Data loaders for distributed runs: a ``DistributedSampler`` put in where one is needed, batches moved to the device."""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler
from torch.utils._pytree import tree_map_only
from torch.utils.data.dataset import IterableDataset


def with_distributed_sampler(
    loader: DataLoader,
    world_size: int,
    rank: int,
    seed: int,
    shuffle: bool | None = None,
    pad_to_equal: bool = True,
) -> DataLoader:
    """A copy of ``loader`` in which each rank reads its own 1/world_size of the samples, and
    which can start an epoch at any batch without loading the batches before it.

    ``batch_size`` stays per process, as in Lightning: the global batch is ``batch_size * world_size``.
    A ``RandomSampler`` or ``SequentialSampler`` becomes a ``DistributedSampler``, also in one
    process: its order is seeded by ``seed`` and the epoch, not by the global RNG, so a run
    resumed mid-epoch sees the same order as the uninterrupted one. Map-style loaders get a
    :class:`ResumableSampler` (skipping costs indices, not samples). Iterable datasets and
    loaders with a ``state_dict`` (torchdata's ``StatefulDataLoader``) keep their own sampling;
    custom samplers too (with a warning under several processes: sharding them is the user's job).
    ``shuffle`` overrides the loader's own choice for a plain ``RandomSampler``/``SequentialSampler``
    (None: shuffle exactly when the loader was made with ``shuffle=True``).
    """
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        return loader
    if isinstance(loader.sampler, ResumableSampler) or isinstance(loader.batch_sampler, ResumableSampler):
        return loader  # set up already
    stateful = is_stateful(loader)
    sampler: Any = loader.sampler
    plain_random = type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None
    if type(loader.batch_sampler) is BatchSampler and (plain_random or type(sampler) is SequentialSampler):
        sampler = (DistributedSampler if pad_to_equal else UnpaddedDistributedSampler)(
            loader.dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=isinstance(sampler, RandomSampler) if shuffle is None else shuffle,
            seed=seed,
            drop_last=loader.drop_last,
        )
    elif world_size > 1 and not isinstance(sampler, DistributedSampler):
        warnings.warn(
            "the train/val DataLoader has a custom sampler; shardtrain did not insert a DistributedSampler, "
            "so make sure each rank reads different data",
            stacklevel=3,
        )
    if stateful:  # it saves and restores its own position: only the sampler changes
        return loader if sampler is loader.sampler else _rebuild(loader, sampler=sampler)
    if type(loader.batch_sampler) is BatchSampler:
        return _rebuild(loader, sampler=ResumableSampler(sampler, items_per_batch=loader.batch_size))
    return _rebuild(loader, batch_sampler=ResumableSampler(loader.batch_sampler, items_per_batch=1))


class UnpaddedDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` that repeats no sample to even the ranks' shares (Lightning's for ``predict``, where
    a repeated sample would be a duplicate prediction): rank ``r`` reads samples ``r, r + world_size, ...``."""

    def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.total_size, generator=generator).tolist()
        else:
            order = list(range(self.total_size))
        return iter(order[self.rank : self.total_size : self.num_replicas])


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` saves and restores its own position (torchdata's ``StatefulDataLoader``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


class ResumableSampler(Sampler):
    """Wraps a sampler (or a batch sampler); its next iteration leaves out the first ``skip`` items.

    The items are indices, so skipping costs nothing: no sample before the resume point is loaded.
    Only the next iteration is shortened; the epoch after it starts from the beginning.
    """

    def __init__(self, sampler: Iterable[Any], items_per_batch: int) -> None:
        self.sampler = sampler
        self.items_per_batch = items_per_batch  # items in one batch: batch_size for a sampler, 1 for a batch sampler
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    @property
    def batch_size(self) -> int | None:
        return getattr(self.sampler, "batch_size", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _rebuild(loader: DataLoader, **sampling: Any) -> DataLoader:
    """``loader`` with another sampler or batch sampler (a DataLoader does not allow changing them)."""
    batching = (
        {"batch_sampler": sampling["batch_sampler"]}
        if "batch_sampler" in sampling
        else {"sampler": sampling["sampler"], "batch_size": loader.batch_size, "drop_last": loader.drop_last}
    )
    kind = type(loader) if is_stateful(loader) else DataLoader  # a subclass's own __init__ may take other arguments
    return kind(  # type: ignore[call-arg]
        loader.dataset,
        **batching,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        **({"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}),
    )


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in lists, tuples, namedtuples, dicts) on ``device``."""
    return tree_map_only(torch.Tensor, lambda tensor: tensor.to(device, non_blocking=True), batch)


class DeviceDataLoader:
    """Iterates a loader and yields batches already on the device; ``set_epoch`` reshuffles per epoch.

    ``start_at(k)`` makes the next iteration begin at batch ``k`` of the epoch (a resumed run): a
    map-style loader skips indices, a loader with a ``state_dict`` has restored its position
    already, and a plain loader over an ``IterableDataset`` can only read and discard ``k`` batches.
    """

    def __init__(self, loader: DataLoader, device: torch.device, transfer: Callable[[Any], Any] | None = None) -> None:
        self.loader = loader
        self.device = device
        #: Takes one batch to the device (the batch-transfer hooks); None: every tensor in it is moved.
        self.transfer = transfer
        self._start = 0
        self._position_restored = False

    def start_at(self, batch: int) -> None:
        self._start = batch

    def position(self) -> dict[str, Any] | None:
        """The loader's own saved position (``StatefulDataLoader.state_dict()``); None for other loaders."""
        return self.loader.state_dict() if is_stateful(self.loader) else None  # type: ignore[attr-defined]

    def restore_position(self, state: dict[str, Any]) -> None:
        """Give the loader its saved position back: the next iteration continues from there."""
        self.loader.load_state_dict(state)  # type: ignore[attr-defined]
        self._position_restored = True

    def __iter__(self) -> Iterator[Any]:
        start, self._start = self._start, 0
        restored, self._position_restored = self._position_restored, False
        resumable = _resumable_sampler(self.loader)
        if start and resumable is not None:
            resumable.skip = start * resumable.items_per_batch
        if start:
            # Making an iterator draws a seed from the global RNG; the uninterrupted run drew it at the
            # start of the epoch, before the RNG state that the checkpoint holds.
            with torch.random.fork_rng(devices=[]):
                iterator = iter(self.loader)
        else:
            iterator = iter(self.loader)
        if start and resumable is None and not restored:
            _warn_reading_to_resume(start)
            for _ in itertools.islice(iterator, start):
                pass
        for batch in iterator:
            yield move_to_device(batch, self.device) if self.transfer is None else self.transfer(batch)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int | None:
        if self.loader.batch_size is None:  # batches from a (resumable) batch sampler
            return getattr(self.loader.batch_sampler, "batch_size", None)
        return self.loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if not hasattr(sampler, "set_epoch"):
            sampler = getattr(self.loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _resumable_sampler(loader: Any) -> ResumableSampler | None:
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if isinstance(sampler, ResumableSampler):
            return sampler
    return None


_warned_reading_to_resume = False


def _warn_reading_to_resume(batches: int) -> None:
    global _warned_reading_to_resume
    if _warned_reading_to_resume:
        return
    _warned_reading_to_resume = True
    warnings.warn(
        f"resuming mid-epoch over an IterableDataset with a DataLoader that saved no position reads and discards the {batches} "
        "batches already trained on; torchdata's StatefulDataLoader saves its position in the checkpoint instead "
        "(pip install 'shardtrain[torchdata]', then pass torchdata.stateful_dataloader.StatefulDataLoader)",
        stacklevel=2,
    )
