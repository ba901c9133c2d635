"""ModelCheckpoint, EarlyStopping and LearningRateMonitor against Lightning (``tests/lightning_port/callbacks.py``)."""

from __future__ import annotations

import pytest

from shardtrain import ConfigError, ModelCheckpoint, Trainer
from tests.lightning_port import run
from tests.lightning_port.compare import assert_same


def test_callbacks_match_lightning(tmp_path):
    theirs = run("callbacks", "lightning", tmp_path / "lightning", num_sanity_val_steps=0)
    ours = run("callbacks", "shardtrain", tmp_path / "shardtrain", strategy="single")
    assert theirs["stopped_epoch"] == 4 and len(theirs["lrs"]) == theirs["global_step"]
    # shardtrain's addition: ModelCheckpoint(save_on_train_end=True) also saves when training ends
    train_end = f"epoch={ours['current_epoch']}-step={ours['global_step']}"
    theirs["step_files"] = [name.removesuffix(".ckpt") for name in theirs["step_files"]]  # files there, dirs here
    assert ours["step_files"] == sorted([*theirs["step_files"], train_end])
    ours["step_files"].remove(train_end)
    assert ours["checkpoint_saves"][-1] == "steps"  # the loggers hear of every save, that one too
    ours["checkpoint_saves"].pop()
    # after_save_checkpoint once per save. Lightning's save_last=True writes last.ckpt as one more save (and tells
    # the loggers); shardtrain's last links to the checkpoint just saved, as Lightning's save_last="link", which
    # does not tell them: the callback without save_last is compared exactly.
    mine, lightnings = ours.pop("checkpoint_saves"), theirs.pop("checkpoint_saves")
    assert mine.count("steps") == lightnings.count("steps") == len(theirs["step_files"])
    assert 0 < mine.count("best") <= lightnings.count("best")
    assert_same(ours, theirs)  # the learning rates at Lightning's steps too


def test_checkpointing_off_with_a_model_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="enable_checkpointing=False, but a ModelCheckpoint"):
        Trainer(enable_checkpointing=False, callbacks=[ModelCheckpoint()])


def test_filename_templates_follow_lightning():
    callback = ModelCheckpoint(filename="{epoch:03d}-{val_loss:.2f}")
    assert callback.format_checkpoint_name({"epoch": 5, "val_loss": 0.123456}) == "epoch=005-val_loss=0.12"
    plain = ModelCheckpoint(filename="e{epoch}", auto_insert_metric_name=False)
    assert plain.format_checkpoint_name({"epoch": 2}) == "e2"
    assert ModelCheckpoint().format_checkpoint_name({"step": 7, "epoch": 0}) == "step=7"
