"""ModelSummary / RichModelSummary against Lightning's own summary of the same module: the same rows (names,
types, parameter counts, modes) at each depth and the same totals; printed when fit starts."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary as LightningSummary
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import TrainModule, Trainer
from shardtrain.callbacks import ModelSummary, RichModelSummary
from shardtrain.callbacks.model_summary import summarize


def _layers(module: nn.Module) -> None:
    module.enc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2), nn.Dropout()))
    module.head = nn.Linear(2, 1)
    module.head.weight.requires_grad_(False)
    module.enc[2][1].eval()


class Net(TrainModule):
    def __init__(self):
        super().__init__()
        _layers(self)

    def training_step(self, batch, batch_idx):
        return self.head(self.enc(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("depth", [1, 2, -1])
def test_rows_and_totals_are_lightnings(depth):
    import lightning.pytorch as L

    class LightningNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            _layers(self)

    ours, theirs = summarize(Net(), depth), LightningSummary(LightningNet(), max_depth=depth)
    assert [row.name for row in ours.rows] == theirs.layer_names
    assert [row.type for row in ours.rows] == theirs.layer_types
    assert [row.params for row in ours.rows] == theirs.param_nums
    assert [row.mode == "train" for row in ours.rows] == theirs.training_modes
    assert (ours.trainable_parameters, ours.total_parameters) == (theirs.trainable_parameters, theirs.total_parameters)
    assert ours.model_size == pytest.approx(theirs.model_size)


@pytest.mark.parametrize("callback", [ModelSummary(max_depth=2), RichModelSummary(max_depth=2)])
def test_printed_when_fit_starts(tmp_path, capsys, callback):
    trainer = Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(Net(), DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4))
    out = capsys.readouterr().out
    assert "enc.2" in out and "Sequential" in out and "Trainable params" in out
    assert "59" in out and "Total params" in out  # 40 + 18 + 1 trainable; 61 in all
