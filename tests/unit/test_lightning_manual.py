"""Manual optimization (``automatic_optimization = False``) against Lightning in one process, and its refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import shardtrain
from shardtrain.errors import ConfigError
from tests.lightning_port import run


def max_difference(ours, theirs):
    return max(abs(a - b) for name in theirs for a, b in zip(ours[name], theirs[name]))


def test_manual_gan_matches_lightning(tmp_path):
    """Two optimizers, three backward calls per batch, toggle_optimizer, clip_gradients, a scheduler stepped by
    hand: the same hooks in the same order, weights, learning rates, global_step and logged values."""
    theirs = run("manual_gan", "lightning", tmp_path / "theirs")
    ours = run("manual_gan", "shardtrain", tmp_path / "ours", strategy="single")
    assert ours["calls"] == theirs["calls"]
    assert ours["global_step"] == theirs["global_step"] == 16  # each optimizer.step() counts
    assert ours["lrs"] == pytest.approx(theirs["lrs"]) and theirs["lrs"][0] == pytest.approx(0.01 * 0.5**4)
    assert ours["requires_grad"] == theirs["requires_grad"] == [[False] * 4 + [True] * 4] * 2
    assert max_difference(ours["weights"], theirs["weights"]) < 1e-6
    assert [row["d_loss"] for row in ours["rows"]] == pytest.approx([row["d_loss"] for row in theirs["rows"]])
    assert [row["g_lr"] for row in ours["rows"]] == pytest.approx([row["g_lr"] for row in theirs["rows"]])
    assert [row["step"] for row in ours["rows"]] == [row["step"] for row in theirs["rows"]]  # batches, from 0


def test_manual_max_steps_counts_optimizer_steps_and_resume_continues(tmp_path):
    theirs = run("manual_gan", "lightning", tmp_path / "theirs", max_steps=6)
    ours = run("manual_gan", "shardtrain", tmp_path / "ours", strategy="single", max_steps=6)
    assert ours["global_step"] == theirs["global_step"] == 6  # 3 batches, 2 steps each
    assert max_difference(ours["weights"], theirs["weights"]) < 1e-6
    # Stopped at step 6, saved, resumed into a module with other weights: the rest of the run is the uninterrupted
    # run's (every optimizer's and the scheduler's state restored). Lightning's own resume from a checkpoint saved
    # after fit stopped mid-epoch starts the next epoch instead, so the comparison is with its uninterrupted run.
    uninterrupted = run("manual_gan", "lightning", tmp_path / "full")
    resumed = run("manual_gan", "shardtrain", tmp_path / "resumed", strategy="single", resume=True, max_steps=6)
    assert resumed["first_global_step"] == 6 and resumed["global_step"] == uninterrupted["global_step"] == 16
    assert resumed["lrs"] == pytest.approx(uninterrupted["lrs"])
    assert max_difference(resumed["weights"], uninterrupted["weights"]) < 1e-6


def test_manual_one_optimizer_matches_lightning(tmp_path):
    theirs = run("manual_gan", "lightning", tmp_path / "theirs", model="one")
    ours = run("manual_gan", "shardtrain", tmp_path / "ours", strategy="single", model="one")
    assert ours["calls"] == theirs["calls"] and ours["global_step"] == theirs["global_step"] == 8
    assert max_difference(ours["weights"], theirs["weights"]) < 1e-6
    assert [row["loss"] for row in ours["rows"]] == pytest.approx([row["loss"] for row in theirs["rows"]])


def test_manual_backward_arguments_and_the_backward_hook_match_lightning(tmp_path):
    theirs = run("manual_gan", "lightning", tmp_path / "theirs", model="retain_graph")
    ours = run("manual_gan", "shardtrain", tmp_path / "ours", strategy="single", model="retain_graph")
    assert ours["calls"] == theirs["calls"]
    assert ours["calls"].count("backward['retain_graph']") == ours["calls"].count("backward[]") == 8
    assert max_difference(ours["weights"], theirs["weights"]) < 1e-6
    assert [row["loss"] for row in ours["rows"]] == pytest.approx([row["loss"] for row in theirs["rows"]])


# ---------------------------------------------------------------------------------------------- refusals
class Manual(shardtrain.TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt = self.optimizers()
        self.manual_backward(self.net(x).pow(2).mean())
        opt.step()
        opt.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


def fit(module, **kwargs):
    trainer = shardtrain.Trainer(accelerator="cpu", strategy="single", max_epochs=1, logger=False, **kwargs)
    trainer.fit(module, loader())
    return trainer


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"gradient_clip_val": 1.0}, "Automatic gradient clipping is not supported for manual optimization"),
        ({"accumulate_grad_batches": 2}, "Automatic gradient accumulation is not supported for manual optimization"),
        ({"on_nonfinite": "stop"}, "remove on_nonfinite"),
    ],
)
def test_manual_refuses_trainer_settings_it_cannot_honour(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        fit(Manual(), **kwargs)


@pytest.mark.parametrize("hook", ["optimizer_step", "optimizer_zero_grad", "configure_gradient_clipping"])
def test_manual_refuses_hooks_only_automatic_optimization_calls(hook):
    module_class = type("WithHook", (Manual,), {hook: lambda self, *args, **kwargs: None})
    with pytest.raises(ConfigError, match=f"automatic_optimization = False and overrides {hook}"):
        fit(module_class())


def test_manual_backward_in_automatic_optimization_names_the_fix():
    class Automatic(Manual):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = True

    with pytest.raises(ConfigError, match="set self.automatic_optimization = False"):
        fit(Automatic())


def test_manual_step_rejects_lightning_only_arguments():
    class StepKwargs(Manual):
        def training_step(self, batch, batch_idx):
            self.optimizers().step(foo=1)

    with pytest.raises(ConfigError, match="takes only closure"):
        fit(StepKwargs())

    class NoSync(Manual):
        def training_step(self, batch, batch_idx):
            with self.optimizers().toggle_model(sync_grad=False):
                pass

    with pytest.raises(ConfigError, match="sync_grad=False"):
        fit(NoSync())


def test_manual_step_with_closure_and_no_scheduler():
    """``optimizer.step(closure)`` runs the closure (forward and manual_backward) first; ``lr_schedulers()`` is None;
    ``optimizers(use_pl_optimizer=False)`` gives the optimizer itself; the Trainer itself zeroes no gradient."""
    seen = {}

    class Closure(Manual):
        def training_step(self, batch, batch_idx):
            (x,) = batch
            opt = self.optimizers()
            seen["scheduler"] = self.lr_schedulers()
            seen["raw"] = isinstance(self.optimizers(use_pl_optimizer=False), torch.optim.SGD)

            def closure():
                loss = self.net(x).pow(2).mean()
                self.manual_backward(loss)
                return loss

            seen["loss"] = opt.step(closure)
            seen["grad_kept"] = self.net.weight.grad is not None  # not zeroed: the module zeroes when it wants

    trainer = fit(Closure())
    assert trainer.global_step == 2 and seen["scheduler"] is None and seen["raw"] and seen["grad_kept"]
    assert seen["loss"].shape == ()


def test_manual_under_model_parallel_is_refused_naming_the_strategies_that_work():
    from shardtrain.strategies.base import TrainingSettings
    from shardtrain.strategies.model_parallel import ModelParallelStrategy

    with pytest.raises(ConfigError, match="strategy='ddp', 'fsdp' or 'deepspeed'"):
        ModelParallelStrategy().configure_training(TrainingSettings(manual_optimization=True))


def test_manual_under_fsdp_makes_every_child_a_unit_and_refuses_parameters_on_the_root():
    from shardtrain.strategies.fsdp import units_for_manual_optimization

    module = Manual()
    module.extra = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    module.empty = nn.ReLU()
    inner = module.extra[0]
    assert units_for_manual_optimization(module, [inner]) == [module.net, module.extra, inner]
    module.scale = nn.Parameter(torch.ones(()))
    with pytest.raises(ConfigError, match=r"holds \['scale'\] directly: move them into a child module"):
        units_for_manual_optimization(module, [])


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_several_optimizers_under_deepspeed_are_refused_naming_the_fix():
    """Lightning allows manual optimization under DeepSpeed with one optimizer; a GAN's two are refused."""
    from shardtrain.engine.wrapper import ForwardRouter
    from shardtrain.errors import StrategyError
    from shardtrain.strategies.deepspeed.strategy import DeepSpeedStrategy

    gan = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    two = [torch.optim.Adam(gan[0].parameters()), torch.optim.Adam(gan[1].parameters())]
    with pytest.raises(StrategyError, match="DeepSpeed trains one optimizer.*use strategy='fsdp'"):
        DeepSpeedStrategy().setup_module_and_optimizers(ForwardRouter(gan), lambda: two)
