"""Lightning's loggers on 2 processes: rank 0 writes Lightning's directories and files, every rank sees rank 0's
``trainer.log_dir``, as under Lightning's ddp (the oracle module tests/lightning_port/loggers_files.py)."""

from __future__ import annotations

from tests.distributed.test_lightning_port import run_port


def test_csv_and_tensorboard_loggers_under_ddp_match_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "loggers_files", "lightning", "ddp", num_sanity_val_steps=0)
    ours = run_port(tmp_path / "ddp", "loggers_files", "shardtrain", "ddp")
    assert ours[0]["files"] == theirs[0]["files"]  # csv/version_{0,1}/..., tb/version_{0,1}/...: nothing from rank 1
    assert ours[1]["files"] is theirs[1]["files"] is None
    for rank in range(2):
        for mine, lightning in zip(ours[rank]["runs"], theirs[rank]["runs"], strict=True):
            assert mine["seen"] == lightning["seen"]  # trainer.log_dir: rank 0's version on both ranks
            assert mine["log_dir"] == lightning["log_dir"]
            if rank == 0:
                assert mine["csv_hparams"] == lightning["csv_hparams"]
                assert [c for c in mine["csv_columns"] if c != "train_loss"] == lightning["csv_columns"]
