"""A module built as Lightning users build it, layers in ``__init__``: measured as it is, trained with ``strategy="auto"``."""

import csv
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.gpt.model import GPTConfig, GPTModule
from shardtrain import TrainModule, Trainer
from shardtrain.estimate.table import estimate_memory


class EagerGPT(GPTModule):
    """The example GPT with its layers built in ``__init__`` and nothing left for ``configure_model``."""

    def __init__(self, config):
        super().__init__(config)
        super().configure_model()

    def configure_model(self):
        pass


class EagerRegression(TrainModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.register_buffer("scale", torch.ones(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x) * self.scale, y)
        self.log("train_mse", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def test_an_eagerly_built_module_is_estimated_like_the_same_module_built_in_configure_model():
    config = GPTConfig(vocab_size=128, d_model=32, n_layer=2, n_head=2, seq_len=16)
    lazy, eager = GPTModule(config), EagerGPT(config)
    before = [(n, p.data_ptr(), p.device.type) for n, p in eager.named_parameters()]
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        expected = estimate_memory(lazy, devices=2, precision=precision, batch_size=2)
        got = estimate_memory(eager, devices=2, precision=precision, batch_size=2)
        assert replace(got, model="GPTModule") == expected, precision
        assert got.activation_bytes > 0 and got.parameters == config.num_parameters

    assert [(n, p.data_ptr(), p.device.type) for n, p in eager.named_parameters()] == before  # untouched


def test_tied_weights_of_an_eager_module_are_counted_once():
    class Tied(TrainModule):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    assert estimate_memory(Tied()).parameters == 80


def test_default_trainer_fits_an_eagerly_built_module_and_the_loss_falls(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    module = EagerRegression()
    trainer = Trainer(max_epochs=8, default_root_dir=tmp_path, log_every_n_steps=1, enable_progress_bar=False)
    trainer.fit(module, DataLoader(data, batch_size=16))
    assert trainer.strategy.name == "single"
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train_loss")]
    assert len(losses) == 32
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
