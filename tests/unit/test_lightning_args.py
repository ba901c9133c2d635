"""Lightning's common Trainer arguments and loop details (AREA=args): each case runs ``tests/lightning_port/args_loop.py``
under Lightning as written and under shardtrain ported by its imports, and compares what they did; then the
refusals, the seeding helpers and the parts a single-process oracle cannot show."""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch
from torch import nn

from shardtrain import ConfigError, Trainer, TrainModule, seed_everything
from shardtrain.seed import _seed_sequence, worker_init_function
from shardtrain.trainer.arguments import TrainerArguments
from shardtrain.trainer.loop_options import convert_sync_batchnorm, debug_limits
from shardtrain.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from tests.lightning_port import run

CASES = {
    # sanity check (2 batches), zero_grad before the first backward of each accumulated step
    "accumulate": {"accumulate_grad_batches": 2},
    "sanity_all": {"num_sanity_val_steps": -1, "max_epochs": 1},
    "sanity_none": {"num_sanity_val_steps": 0, "max_epochs": 1},
    # stop requests before min_epochs / min_steps are put off; validation runs when the stop ends the epoch
    "min_epochs": {"min_epochs": 3, "max_epochs": 5, "stop_at_step": 1},
    "min_steps": {"min_steps": 6, "max_epochs": 5, "stop_at_step": 1},
    "stop_mid_epoch": {"max_epochs": 5, "stop_at_step": 6},
    # max_steps mid-epoch still ends the epoch with on_train_epoch_end
    "max_steps": {"max_steps": 6, "max_epochs": 5},
    "skip_rest_of_epoch": {"skip_at": 2},
    "fast_dev_run": {"fast_dev_run": 2},
    "fast_dev_run_true": {"fast_dev_run": True},
    "overfit": {"overfit_batches": 2, "max_epochs": 3, "shuffle": True},
    "overfit_fraction": {"overfit_batches": 0.5, "max_epochs": 2},
    "no_grad": {"inference_mode": False, "max_epochs": 1},
    "reload": {"reload_dataloaders_every_n_epochs": 1, "max_epochs": 3},
    "limits": {"limit_train_batches": 3, "limit_val_batches": 1, "max_epochs": 2},
}


@pytest.fixture
def restore_torch_flags():
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loop_matches_lightning(tmp_path, case):
    kwargs = CASES[case]
    theirs = run("args_loop", "lightning", tmp_path / "theirs", **kwargs)
    ours = run("args_loop", "shardtrain", tmp_path / "ours", strategy="single", **kwargs)
    for key in ("calls", "callback_calls", "train_batches", "val_batches", "seen", "loaders_made", "global_step"):
        assert ours[key] == theirs[key], key
    for name, values in theirs["weights"].items():
        assert ours["weights"][name] == pytest.approx(values, abs=1e-6), name
    their_losses = [row["loss"] for row in theirs["rows"] if "loss" in row]
    assert [row["loss"] for row in ours["rows"] if "loss" in row] == pytest.approx(their_losses, abs=1e-6)
    if kwargs.get("fast_dev_run"):
        assert ours["rows"] == theirs["rows"] == []
        assert not (tmp_path / "ours" / "checkpoints").exists()


@pytest.mark.parametrize("deterministic", [True, "warn", False])
def test_deterministic_and_benchmark_set_torch_flags_as_lightning(tmp_path, restore_torch_flags, deterministic):
    kwargs = {"deterministic": deterministic, "max_epochs": 1, "limit_train_batches": 1, "num_sanity_val_steps": 0}
    torch.use_deterministic_algorithms(not deterministic)
    torch.backends.cudnn.benchmark = True
    theirs = run("args_loop", "lightning", tmp_path / "theirs", **kwargs)
    warn_only_theirs = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(not deterministic)
    torch.backends.cudnn.benchmark = True
    ours = run("args_loop", "shardtrain", tmp_path / "ours", strategy="single", **kwargs)
    assert ours["torch_flags"] == theirs["torch_flags"]
    assert torch.is_deterministic_algorithms_warn_only_enabled() == warn_only_theirs
    if deterministic:
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    Trainer(accelerator="cpu", benchmark=True, logger=False)
    assert torch.backends.cudnn.benchmark is True


def test_fast_dev_run_and_overfit_become_limits():
    args = debug_limits(TrainerArguments(fast_dev_run=3, max_epochs=10))
    assert (args.limit_train_batches, args.limit_val_batches, args.max_steps, args.max_epochs) == (3, 3, 3, 1)
    assert args.num_sanity_val_steps == 0
    args = debug_limits(TrainerArguments(overfit_batches=0.25))
    assert (args.limit_train_batches, args.limit_val_batches) == (0.25, 0.25)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("min_epochs", -1),
        ("min_steps", 1.5),
        ("num_sanity_val_steps", -2),
        ("num_sanity_val_steps", 1.0),
        ("fast_dev_run", -1),
        ("fast_dev_run", "yes"),
        ("overfit_batches", -1),
        ("overfit_batches", 1.5),
        ("overfit_batches", True),
        ("deterministic", "always"),
        ("benchmark", "yes"),
        ("inference_mode", None),
        ("use_distributed_sampler", 1),
        ("sync_batchnorm", "yes"),
        ("reload_dataloaders_every_n_epochs", -1),
    ],
)
def test_refused_values_name_the_argument(name, value):
    with pytest.raises(ConfigError, match=name):
        TrainerArguments(**{name: value})


def test_other_lightning_arguments_stay_refused():
    with pytest.raises(ConfigError, match="detect_anomaly"):
        Trainer(detect_anomaly=True)


class _WithBatchNorm(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def test_sync_batchnorm_converts_and_is_refused_where_it_cannot_sync():
    module = convert_sync_batchnorm(_WithBatchNorm(), "ddp")
    assert isinstance(module.net[1], nn.SyncBatchNorm)
    with pytest.raises(ConfigError, match="sync_batchnorm"):
        convert_sync_batchnorm(_WithBatchNorm(), "deepspeed")
    with pytest.raises(ConfigError, match="sync_batchnorm"):
        convert_sync_batchnorm(nn.BatchNorm1d(4), "ddp")
    with pytest.raises(ConfigError, match="needs CUDA"):
        convert_sync_batchnorm(_WithBatchNorm(), "ddp", "cpu", world_size=2)


def test_sync_batchnorm_in_one_process_converts_and_trains(tmp_path):
    class Normed(_WithBatchNorm):
        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Normed()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = Trainer(
        accelerator="cpu",
        sync_batchnorm=True,
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert isinstance(module.net[1], nn.SyncBatchNorm) and trainer.global_step == 2
    assert module.net[1].num_batches_tracked.item() == 2


def test_seed_everything_as_lightning(monkeypatch):
    from lightning.fabric.utilities import seed as lightning_seed

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    with pytest.warns(UserWarning, match="No seed found"):
        assert seed_everything() == 0
    assert seed_everything(123, workers=True) == 123
    assert os.environ["PL_GLOBAL_SEED"] == "123" and os.environ["PL_SEED_WORKERS"] == "1"
    ours = (torch.rand(2).tolist(), random.random())
    lightning_seed.seed_everything(123, verbose=False)
    assert (torch.rand(2).tolist(), random.random()) == ours
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert seed_everything(verbose=False) == 7
    assert os.environ["PL_SEED_WORKERS"] == "0"
    with pytest.raises(ValueError, match="not in bounds"):
        seed_everything(2**40)


def test_worker_init_function_draws_lightnings_numbers():
    from lightning.fabric.utilities import seed as lightning_seed

    assert _seed_sequence(12345, 3, 1, 4) == lightning_seed._generate_seed_sequence(12345, 3, 1, 4)
    torch.manual_seed(99)
    worker_init_function(2, rank=1)
    ours = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(99)
    lightning_seed.pl_worker_init_function(2, rank=1)
    assert (torch.rand(3).tolist(), random.random()) == ours


def test_rank_zero_helpers(monkeypatch, caplog):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rank_zero_warn("not on rank 1")
    assert rank_zero_only(lambda: 1, default=5)() == 5
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    with pytest.warns(UserWarning, match="on rank 0"):
        rank_zero_warn("on rank 0")
    with caplog.at_level("INFO", logger="shardtrain"):
        rank_zero_info("hello %s", "there")
    assert "hello there" in caplog.text
