"""DataModule: where a run's data loaders come from when they are configured by class path."""

from __future__ import annotations

from torch.utils.data import DataLoader


class DataModule:
    """Override ``train_dataloader()`` (and ``val_dataloader()`` for validation).

    ``batch_size`` in the loaders is per process; the Trainer inserts distributed samplers.
    """

    def train_dataloader(self) -> DataLoader:
        raise NotImplementedError(f"{type(self).__name__} must define train_dataloader()")

    def val_dataloader(self) -> DataLoader | None:
        return None
