"""DataModule: a run's data, with Lightning's ``LightningDataModule`` hooks (change the import and the base class).

The Trainer calls them as Lightning does: ``prepare_data()`` once per node (``prepare_data_per_node = False``: once
in the run) before ``setup(stage)`` on every rank, with ``stage`` one of ``"fit"``, ``"validate"``, ``"test"``,
``"predict"``; then the loaders of the stage; ``teardown(stage)`` at its end (after an exception too), and
``on_exception(exception)`` when the stage fails. ``state_dict()`` (JSON-able values) is saved in the Trainer's
checkpoints and given back to ``load_state_dict`` on resume.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from shardtrain.hparams import HyperparametersMixin

if TYPE_CHECKING:
    from typing_extensions import Self

    from shardtrain.trainer.trainer import Trainer


class DataModule(HyperparametersMixin):
    """Override the ``*_dataloader()`` methods a run needs (``batch_size`` is per process; the Trainer inserts
    distributed samplers), and ``prepare_data``/``setup``/``teardown`` to download, split and free the data.

    A loader method left as it is here means "this stage has no data" (``val_dataloader``: no validation).
    """

    #: Lightning's: ``prepare_data()`` runs on local rank 0 of every node (True) or on global rank 0 only (False).
    prepare_data_per_node: bool = True
    #: The Trainer running this DataModule (set when a stage starts), as in Lightning.
    trainer: Trainer | None = None

    def __init__(self) -> None:
        super().__init__()

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path: str | os.PathLike, hparams_file: str | os.PathLike | None = None, **kwargs: Any
    ) -> Self:
        """Lightning's: the DataModule built again from the hyperparameters a Trainer checkpoint recorded
        (``kwargs`` override them), with its saved ``state_dict`` loaded."""
        from shardtrain.from_checkpoint import load_datamodule

        return load_datamodule(cls, checkpoint_path, hparams_file, **kwargs)

    def prepare_data(self) -> None:
        """Download or write data to disk, once per node; do not set state here (other ranks do not see it)."""

    def setup(self, stage: str) -> None:
        """Build datasets and splits on every rank, at the start of ``stage``."""

    def teardown(self, stage: str) -> None:
        """Free what ``setup`` built, at the end of ``stage``."""

    def train_dataloader(self) -> DataLoader:
        raise NotImplementedError(f"{type(self).__name__} must define train_dataloader() to be fitted")

    def val_dataloader(self) -> DataLoader | None:
        return None

    def test_dataloader(self) -> DataLoader | None:
        return None

    def predict_dataloader(self) -> DataLoader | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """What to save in checkpoints (JSON-able values); empty by default."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, on resume."""

    def on_exception(self, exception: BaseException) -> None:
        """Called when the stage fails, before ``teardown``."""
