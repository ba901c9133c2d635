"""Lightning's batch-transfer hooks (its ``DataHooks``), shared by ``TrainModule`` and ``DataModule``.

Each batch a loader yields goes through ``on_before_batch_transfer(batch, dataloader_idx)``,
``transfer_batch_to_device(batch, device, dataloader_idx)`` and ``on_after_batch_transfer(batch, dataloader_idx)``,
in that order, before the batch-start hooks, in every stage (and the sanity check), as Lightning does.
``batch_transfer`` picks whose hook runs as Lightning's ``_DataHookSelector``: the DataModule given to the stage
when it overrides the hook, else the module (a DataModule kept from an earlier stage does not count).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from shardtrain.data import move_to_device
from shardtrain.logged import current_hook
from shardtrain.overrides import overrides

HOOK_NAMES = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


class BatchTransferHooks:
    """The three hooks with Lightning's defaults: the batch unchanged, and every tensor in it moved to ``device``."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Change ``batch`` before it is moved to the device (on the host, e.g. a CPU-side augmentation)."""
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move ``batch`` to ``device``: by default every tensor in it (in lists, tuples, namedtuples, dicts). Override
        for a batch of your own type."""
        return move_to_device(batch, device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Change ``batch`` once it is on the device (e.g. a GPU-side augmentation)."""
        return batch


def batch_transfer(
    module: BatchTransferHooks, datamodule: BatchTransferHooks | None, device: torch.device, dataloader_idx: int
) -> Callable[[Any], Any] | None:
    """The function that takes one of loader ``dataloader_idx``'s batches to ``device`` through the hooks, or None
    when neither ``module`` nor ``datamodule`` overrides any of them (the loader moves batches itself then)."""
    owners = {}
    for name in HOOK_NAMES:
        owner: Any = module
        if datamodule is not None and overrides(datamodule, name, BatchTransferHooks):
            if overrides(module, name, BatchTransferHooks):
                warnings.warn(
                    f"{name} is overridden in both {type(module).__name__} and {type(datamodule).__name__}: the "
                    "DataModule's runs, as in Lightning",
                    stacklevel=2,
                )
            owner = datamodule
        owners[name] = owner
    if not any(overrides(owner, name, BatchTransferHooks) for name, owner in owners.items()):
        return None

    def transfer(batch: Any) -> Any:
        with current_hook(module, "on_before_batch_transfer"):
            batch = owners["on_before_batch_transfer"].on_before_batch_transfer(batch, dataloader_idx)
        with current_hook(module, "transfer_batch_to_device"):
            batch = owners["transfer_batch_to_device"].transfer_batch_to_device(batch, device, dataloader_idx)
        with current_hook(module, "on_after_batch_transfer"):
            return owners["on_after_batch_transfer"].on_after_batch_transfer(batch, dataloader_idx)

    return transfer
