"""Lightning's loggers under shardtrain: the same directories and files as Lightning (oracle), the logger
properties a module sees, trainer.logger/loggers/log_dir, a resume that continues the run's version, refusals."""

from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shardtrain import Trainer
from shardtrain.errors import ConfigError
from shardtrain.loggers import CSVLogger, DummyExperiment, Logger, TensorBoardLogger
from shardtrain.utilities import rank_zero_only
from tests.lightning_port import run
from tests.unit.linear_module import LinearRegression


def test_csv_and_tensorboard_loggers_match_lightning(tmp_path):
    ours = run("loggers_files", "shardtrain", tmp_path / "ours", strategy="single")
    theirs = run("loggers_files", "lightning", tmp_path / "theirs", num_sanity_val_steps=0)
    assert ours["files"] == theirs["files"]  # csv/version_{0,1}/{metrics.csv,hparams.yaml}, tb/version_{0,1}/...
    for mine, lightning in zip(ours["runs"], theirs["runs"], strict=True):
        assert mine["seen"] == lightning["seen"]  # self.logger(s), properties, trainer.log_dir, experiment
        assert mine["trainer_logger"] == lightning["trainer_logger"] and mine["log_dir"] == lightning["log_dir"]
        assert mine["csv_hparams"] == lightning["csv_hparams"]
        # shardtrain also logs train_loss (its own metric; the logging helper's area)
        assert [c for c in mine["csv_columns"] if c != "train_loss"] == lightning["csv_columns"]
        assert len(mine["csv_steps"]) == len(lightning["csv_steps"])
        mine_tb = {tag: values for tag, values in mine["tb_scalars"].items() if tag != "train_loss"}
        assert set(mine_tb) == set(lightning["tb_scalars"])
        assert mine_tb["hp_metric"] == lightning["tb_scalars"]["hp_metric"] == [[0, -1.0]]
        assert mine["csv_steps"] == lightning["csv_steps"]
        for tag in ("loss", "val_loss"):  # at Lightning's steps (batches that stepped, from 0)
            assert [step for step, _ in mine_tb[tag]] == [step for step, _ in lightning["tb_scalars"][tag]]
            assert [v for _, v in mine_tb[tag]] == pytest.approx([v for _, v in lightning["tb_scalars"][tag]])
        # TensorBoard's hparams.yaml is written at fit start (save()), before the module's own log_hyperparams call
        assert mine["tb_hparams"] == lightning["tb_hparams"] == {}


def _data():
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, x.sum(1, keepdim=True))


def _fit(root, logger, max_steps=2, ckpt_path=None):
    trainer = Trainer(
        accelerator="cpu",
        default_root_dir=root,
        logger=logger,
        max_steps=max_steps,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LinearRegression(lr=0.05), DataLoader(_data(), batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_trainer_logger_loggers_and_log_dir(tmp_path):
    default = Trainer(accelerator="cpu", default_root_dir=tmp_path)
    assert isinstance(default.logger, CSVLogger) and default.loggers == [default.logger]
    assert default.log_dir == str(tmp_path) and default.logger.path == tmp_path / "metrics.csv"
    none = Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=False)
    assert none.logger is None and none.loggers == [] and none.log_dir == str(tmp_path)
    tb = TensorBoardLogger(tmp_path, name="tb", version="run", sub_dir="train")
    one = Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=tb)
    assert one.logger is tb and one.loggers == [tb] and one.log_dir == str(tmp_path / "tb" / "run" / "train")
    mine = _Mine()
    other = Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=[mine, tb])
    assert other.logger is mine and other.log_dir == "elsewhere"  # not a file logger: its save_dir
    other.logger = tb
    assert other.loggers == [tb]
    other.logger = None
    assert other.loggers == [] and other.logger is None
    module = LinearRegression(lr=0.1)
    assert module.logger is None and module.loggers == []


class _Mine(Logger):
    """A user's logger in Lightning's style: name, version, rank-zero log_metrics/log_hyperparams."""

    def __init__(self):
        self.rows = []

    @property
    def name(self):
        return "mine"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return "elsewhere"

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_users_logger_gets_rows_and_finalize_status(tmp_path):
    class Finalizing(_Mine):
        statuses: list = []

        def finalize(self, status):
            self.statuses.append(status)

    logger = Finalizing()
    _fit(tmp_path, logger)
    assert [step for step, _ in logger.rows] == [0, 1] and logger.statuses == ["success"]
    assert logger.group_separator == "/" and logger.log_dir is None and logger.root_dir is None
    assert Logger().name is None and Logger().version is None

    class Older(_Mine):  # written against shardtrain's earlier Logger: finalize() without a status
        def finalize(self):
            self.finalized = True

    older = Older()
    _fit(tmp_path, older)
    assert older.finalized and len(older.rows) == 2


def test_a_resume_continues_the_runs_version(tmp_path):
    first = _fit(tmp_path, CSVLogger(tmp_path, name="exp"), max_steps=2)
    first.save_checkpoint()
    first_rows = list(csv.DictReader(open(tmp_path / "exp" / "version_0" / "metrics.csv")))
    resumed_logger = CSVLogger(tmp_path, name="exp")
    resumed_logger.log_hyperparams({"lr": 0.05})  # chooses version_1 before the resume: given up, moved over
    assert resumed_logger.version == 1
    _fit(tmp_path, resumed_logger, max_steps=4, ckpt_path="last")
    assert resumed_logger.version == 0 and not (tmp_path / "exp" / "version_1").exists()
    rows = list(csv.DictReader(open(tmp_path / "exp" / "version_0" / "metrics.csv")))
    assert rows[:2] == [{**r, "resumed_from_step": ""} for r in first_rows]
    assert rows[2]["resumed_from_step"] == "2" and [r["step"] for r in rows[3:]] == ["2", "3"]
    assert (tmp_path / "exp" / "version_0" / "hparams.yaml").read_text() == "lr: 0.05\n"
    _fit(tmp_path, fresh := CSVLogger(tmp_path, name="exp"))  # a fresh run: a new version, as Lightning
    assert fresh.version == 1 and (tmp_path / "exp" / "version_1" / "metrics.csv").is_file()


def test_tensorboard_writes_events_and_hparams_and_nothing_off_rank_zero(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, prefix="p", default_hp_metric=False)
    logger.log_metrics({"a": torch.tensor(1.5), "group": {"x": 1.0, "y": 2.0}}, step=3)
    logger.log_hyperparams({"lr": 0.1, "opt": object()}, metrics={"best": 0.5})
    logger.finalize("success")
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert {"p-a", "p-best"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("p-a")] == [(3, 1.5)]
    assert "lr: 0.1" in (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    elsewhere = TensorBoardLogger(tmp_path, name="other")
    assert isinstance(elsewhere.experiment, DummyExperiment)
    elsewhere.experiment.add_scalar("x", 1.0, 0)
    elsewhere.log_metrics({"x": 1.0}, 0)
    elsewhere.finalize("success")
    assert not (tmp_path / "other").exists()


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="logger must be True, False or Logger objects"):
        Trainer(accelerator="cpu", logger=[CSVLogger(tmp_path), "csv"])
    with pytest.raises(ConfigError, match="logger must be True, False, a Logger or a list"):
        Trainer(accelerator="cpu", logger="csv")
    with pytest.raises(ConfigError, match=r"give CSVLogger\(save_dir=...\) or pass it to a Trainer"):
        CSVLogger().log_dir  # noqa: B018
    given_later = CSVLogger(name="x")
    Trainer(accelerator="cpu", default_root_dir=tmp_path, logger=given_later)
    assert given_later.log_dir == str(tmp_path / "x" / "version_0")


def _ported_and_lightning(tmp_path, service):
    ours = run("loggers_services", "shardtrain", tmp_path / "ours", service=service, strategy="single")
    theirs = run("loggers_services", "lightning", tmp_path / "theirs", service=service, num_sanity_val_steps=0)
    return ours, theirs


def test_wandb_logger_offline_matches_lightning(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # Lightning's offline=True sets "dryrun", which wandb 0.31 ignores
    ours, theirs = _ported_and_lightning(tmp_path, "wandb")
    assert ours["seen"] == theirs["seen"]  # the run started before the setup hooks: version is its id
    assert ours["config"] == theirs["config"] == {"lr": "0.1", "nested": '{"width":8}'}
    assert [{k: v for k, v in row.items() if k != "train_loss"} for row in ours["history"]] == theirs["history"]


def test_mlflow_logger_matches_lightning(tmp_path):
    pytest.importorskip("mlflow")
    ours, theirs = _ported_and_lightning(tmp_path, "mlflow")
    assert ours["seen"] == theirs["seen"]
    assert ours["params"] == theirs["params"] == {"lr": "0.1", "nested/width": "8"}
    assert ours["status"] == theirs["status"] == "FINISHED" and ours["run_name"] == theirs["run_name"] == "first"
    for key, values in theirs["history"].items():
        assert ours["history"][key] == values


@pytest.mark.parametrize("package, make", [("wandb", "WandbLogger"), ("mlflow", "MLFlowLogger")])
def test_service_loggers_refuse_a_missing_package_and_log_model(package, make, monkeypatch):
    import shardtrain.loggers as loggers
    from shardtrain.errors import MissingDependencyError

    with pytest.raises(ConfigError, match=r"log_model=True\) is not supported"):
        pytest.importorskip(package)
        getattr(loggers, make)(log_model=True)
    monkeypatch.setitem(__import__("sys").modules, package, None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=rf"pip install 'shardtrain\[{package}\]'"):
        getattr(loggers, make)()


def test_the_printed_progress_counts_optimizer_steps_while_loggers_get_lightnings(tmp_path, capsys):
    logger = _Mine()
    trainer = Trainer(
        accelerator="cpu", default_root_dir=tmp_path, logger=logger, max_steps=2, log_every_n_steps=1,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LinearRegression(lr=0.05), DataLoader(_data(), batch_size=4))
    printed = capsys.readouterr().out
    assert "step 1/2 " in printed and "step 2/2 " in printed and "step 0/2" not in printed
    assert [step for step, _ in logger.rows] == [0, 1]
