"""Verified checkpoints over real processes: under FSDP on 2 ranks each rank checksums the files it wrote (in the
background for an asynchronous save), the ranks verify a checkpoint together before loading it, a damaged file is
refused by name, and ``ckpt_path="last"`` falls back to the previous checkpoint and continues its loss curve."""

import json
import subprocess
import sys

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed

FSDP2 = ("--devices", "2", "--strategy", "fsdp", "--batch-size", "8")


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.fast
def test_a_damaged_shard_is_refused_by_every_rank_and_last_resumes_from_the_previous_checkpoint(tmp_path):
    uninterrupted = assert_ok(run_script("train_gpt.py", tmp_path, *FSDP2, "--checkpoint-every", "5")).result()
    checkpoints = tmp_path / "checkpoints"
    meta = json.loads((checkpoints / "step=10" / "meta.json").read_text())
    assert set(meta["checksums"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # each rank's own file

    damaged = checkpoints / "step=10" / "__1_0.distcp"  # rank 1's shards
    _flip_a_bit(damaged)
    direct = run_script("train_gpt.py", tmp_path, *FSDP2, "--ckpt-path", str(checkpoints / "step=10"))
    assert direct.returncode != 0
    assert "step=10 is damaged: __1_0.distcp: CRC-32" in direct.output

    run = assert_ok(run_script("train_gpt.py", tmp_path, *FSDP2, "--ckpt-path", "last"))
    assert f"resuming from {(checkpoints / 'step=5').resolve()} instead" in run.output
    resumed = run.result()
    assert resumed["steps"] == list(range(6, 11))
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][5:], abs=1e-6)
    assert resumed["weight_checksum"] == pytest.approx(uninterrupted["weight_checksum"], rel=1e-7)


def test_an_asynchronous_save_records_each_ranks_checksums_in_the_background(tmp_path):
    run = run_script(
        "train_gpt_pipeline.py", tmp_path, *FSDP2, "--max-steps", "3", "--save-at-end", "--async-save"
    )  # fmt: skip
    assert_ok(run)
    (checkpoint,) = (tmp_path / "checkpoints").glob("step=*")
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert set(meta["checksums"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not list(checkpoint.glob(".checksums_rank*"))
    verify = subprocess.run(
        [sys.executable, "-m", "shardtrain", "verify", str(checkpoint)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0 and "ok (3 files" in verify.stdout, verify.stdout + verify.stderr
