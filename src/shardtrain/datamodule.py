"""DataModule: a run's data, with Lightning's ``LightningDataModule`` hooks (change the import and the base class).

The Trainer calls them as Lightning does: ``prepare_data()`` once per node (``prepare_data_per_node = False``: once
in the run) before ``setup(stage)`` on every rank, with ``stage`` one of ``"fit"``, ``"validate"``, ``"test"``,
``"predict"``; then the loaders of the stage; ``teardown(stage)`` at its end (after an exception too), and
``on_exception(exception)`` when the stage fails. ``state_dict()`` (JSON-able values) is saved in the Trainer's
checkpoints and given back to ``load_state_dict`` on resume. The batch-transfer hooks (``on_before_batch_transfer``,
``transfer_batch_to_device``, ``on_after_batch_transfer``) run in place of the module's when the DataModule
overrides them (``shardtrain.batch_transfer``).
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from shardtrain.batch_transfer import BatchTransferHooks
from shardtrain.hparams import HyperparametersMixin

if TYPE_CHECKING:
    from typing_extensions import Self

    from shardtrain.trainer.trainer import Trainer


class DataModule(BatchTransferHooks, HyperparametersMixin):
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

    @classmethod
    def from_datasets(
        cls,
        train_dataset: Dataset | Iterable[Dataset] | None = None,
        val_dataset: Dataset | Iterable[Dataset] | None = None,
        test_dataset: Dataset | Iterable[Dataset] | None = None,
        predict_dataset: Dataset | Iterable[Dataset] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        **datamodule_kwargs: Any,
    ) -> Self:
        """Lightning's: a DataModule whose ``*_dataloader()`` wrap the datasets given (a dataset, or a list, tuple
        or dict of them: one loader each) in ``DataLoader(batch_size, num_workers)``, the training ones shuffled
        (not an ``IterableDataset``). ``batch_size``/``num_workers`` go to ``cls(...)`` too where it takes them."""
        parameters = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        loader_kwargs = {"batch_size": batch_size, "num_workers": num_workers}
        datamodule = cls(
            **datamodule_kwargs, **{k: v for k, v in loader_kwargs.items() if takes_any or k in parameters}
        )
        pin_memory = torch.cuda.is_available()

        def loaders(datasets: Any, shuffle: bool = False) -> Any:
            if isinstance(datasets, Dataset):
                shuffle = shuffle and not isinstance(datasets, IterableDataset)
                return DataLoader(datasets, shuffle=shuffle, pin_memory=pin_memory, **loader_kwargs)  # type: ignore[arg-type]
            if isinstance(datasets, dict):
                return {name: loaders(dataset, shuffle) for name, dataset in datasets.items()}
            return type(datasets)(loaders(dataset, shuffle) for dataset in datasets)

        for hook, datasets in (
            ("train_dataloader", train_dataset),
            ("val_dataloader", val_dataset),
            ("test_dataloader", test_dataset),
            ("predict_dataloader", predict_dataset),
        ):
            if datasets is not None:
                setattr(datamodule, hook, functools.partial(loaders, datasets, hook == "train_dataloader"))
        return datamodule

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
