"""ModelCheckpoint, EarlyStopping and LearningRateMonitor on 2 processes: shardtrain's ddp, fsdp and deepspeed against
Lightning's ddp on the same module: the same checkpoints kept, best score, stop epoch and logged learning rates."""

from __future__ import annotations

from tests.distributed.test_lightning_port import run_port
from tests.lightning_port.compare import assert_same


def test_callbacks_on_two_processes_match_lightnings_ddp(tmp_path):
    theirs = run_port(tmp_path / "lightning", "callbacks", "lightning", "ddp", num_sanity_val_steps=0)
    for strategy in ("ddp", "fsdp", "deepspeed"):
        ours = run_port(tmp_path / strategy, "callbacks", "shardtrain", strategy)
        for rank in range(2):
            mine, reference = dict(ours[rank]), dict(theirs[rank])
            train_end = f"epoch={mine['current_epoch']}-step={mine['global_step']}"  # save_on_train_end's
            reference["step_files"] = [name.removesuffix(".ckpt") for name in reference["step_files"]]
            assert mine.pop("step_files") == sorted([*reference.pop("step_files"), train_end])
            if rank:  # Lightning's rank 0 deletes the replaced checkpoint after its last barrier: rank 1 may list it
                mine.pop("default_files"), reference.pop("default_files")
            saves, their_saves = mine.pop("checkpoint_saves"), reference.pop("checkpoint_saves")
            if rank == 0:  # the loggers hear of saves on rank 0 (see tests/unit/test_lightning_callbacks.py)
                assert saves.count("steps") == their_saves.count("steps") + 1  # and save_on_train_end's
            assert_same(mine, reference)  # the learning rates at Lightning's steps too
