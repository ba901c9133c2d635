"""Fit under DeepSpeed in one process and record what teardown at the end of fit leaves: the
engine destroyed (ZeRO hooks gone, the model refuses to run), the trained state still readable; then
validate, test (on the saved checkpoint) and predict on the same Trainer, each setting the trained
model up again, and the state as readable after them."""

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Callback, StrategyError, TrainModule, Trainer
from shardtrain.strategies import DeepSpeedStrategy

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--stage", type=int, required=True)
args = parser.parse_args()


class Regression(TrainModule):
    def configure_model(self):
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_mse", nn.functional.mse_loss(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])


def module_hooks(module):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules())


def grad_hooks(trainer):
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in trainer.module.parameters())


def flat(state):
    return {name: value.flatten().tolist() for name, value in state.items() if torch.is_tensor(value)}


class BeforeTeardown(Callback):
    def on_fit_end(self, trainer, module):
        strategy = trainer.strategy
        self.hooks = module_hooks(module)
        self.grad_hooks = grad_hooks(trainer)
        self.weights = flat(strategy.module_state_dict(module, full=True))
        self.exp_avg = flat(
            {k: v["exp_avg"] for k, v in strategy.optimizer_state_dict(module, trainer.optimizers[0])["state"].items()}
        )


x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
before = BeforeTeardown()
trainer = Trainer(
    accelerator="cpu",
    devices=1,
    strategy=DeepSpeedStrategy(stage=args.stage),
    max_steps=3,
    callbacks=[before],
    default_root_dir=args.out,
    enable_progress_bar=False,
)
module = Regression()
data = TensorDataset(x, x.sum(dim=1, keepdim=True))
trainer.fit(module, DataLoader(data, batch_size=8))
strategy = trainer.strategy
exp_avg = {k: v["exp_avg"] for k, v in strategy.optimizer_state_dict(module, trainer.optimizers[0])["state"].items()}
saved = trainer.save_checkpoint()
try:
    trainer.model(x[:2])
    refused = ""
except StrategyError as error:
    refused = str(error)
# Evaluation on the same Trainer: each stage sets the trained model up again (a new engine, no optimizer).
validated = trainer.validate(module, DataLoader(data, batch_size=32), verbose=False)[0]["val_mse"]
tested = trainer.test(module, DataLoader(data, batch_size=32), ckpt_path=saved, verbose=False)[0]["test_mse"]
predicted = torch.cat(trainer.predict(module, DataLoader(TensorDataset(x), batch_size=8)))
exp_avg_evaluated = {
    k: v["exp_avg"] for k, v in strategy.optimizer_state_dict(module, trainer.optimizers[0])["state"].items()
}
reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))  # plain torch, the weights read after fit
reference.load_state_dict({k.removeprefix("net."): v for k, v in strategy.module_state_dict(module).items()})
with torch.no_grad():
    expected = reference(x)
result = {
    "validated": validated,
    "tested": tested,
    "expected_mse": nn.functional.mse_loss(expected, data.tensors[1]).item(),
    "predicted": predicted.flatten().tolist(),
    "expected_predictions": expected.flatten().tolist(),
    "exp_avg_after_evaluation": flat(exp_avg_evaluated),
    "destroyed": strategy._destroyed,
    "hooks_before": before.hooks,
    "hooks_after": module_hooks(module),
    "grad_hooks_before": before.grad_hooks,
    "grad_hooks_after": grad_hooks(trainer),
    "weights_before": before.weights,
    "weights_after": flat(strategy.module_state_dict(module, full=True)),
    "exp_avg_before": before.exp_avg,
    "exp_avg_after": flat(exp_avg),
    "saved": (saved / ".metadata").is_file(),
    "refused": refused,
}
(Path(args.out) / "result.json").write_text(json.dumps(result))
