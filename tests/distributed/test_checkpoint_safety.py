"""A payload planted in a multi-process checkpoint never runs, whichever layout loads it: a 2 -> 1
reshard, FSDP -> DDP, and a DeepSpeed run each refuse it naming the file, on every rank."""

import pytest

from shardtrain.checkpoint.pointer import resolve_checkpoint
from tests.checkpoint_payloads import plant_in_bytes_entry, plant_in_metadata
from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed

FSDP_2 = ["--devices", "2", "--strategy", "fsdp", "--batch-size", "8"]


def _saved(tmp_path, save_with):
    assert_ok(run_script("train_gpt.py", tmp_path, *save_with, "--stop-at", "2", "--save-at-end"))
    return resolve_checkpoint(tmp_path / "checkpoints" / "last")


@pytest.mark.parametrize(
    "save_with, resume_with",
    [
        pytest.param(FSDP_2, ["--devices", "1", "--batch-size", "16"], marks=pytest.mark.fast),
        (FSDP_2, ["--devices", "2", "--strategy", "ddp", "--batch-size", "8"]),
        (
            ["--devices", "2", "--strategy", "deepspeed_stage_3", "--batch-size", "8"],
            ["--devices", "2", "--strategy", "deepspeed_stage_3", "--batch-size", "8"],
        ),
    ],
    ids=["fsdp(2)->single(1)", "fsdp->ddp", "zero3->zero3"],
)
def test_a_payload_in_metadata_never_runs(tmp_path, save_with, resume_with):
    checkpoint = _saved(tmp_path, save_with)
    marker = tmp_path / "ran"
    plant_in_metadata(checkpoint, marker)
    run = run_script("train_gpt.py", tmp_path, *resume_with, "--max-steps", "4", "--ckpt-path", "last")
    assert run.returncode != 0 and not marker.exists()
    assert f"{checkpoint}/.metadata asks to run" in run.output


def test_a_payload_in_a_non_tensor_entry_never_runs_on_any_rank(tmp_path):
    checkpoint = _saved(tmp_path, FSDP_2)
    marker = tmp_path / "ran"
    data_file = plant_in_bytes_entry(checkpoint, marker)
    run = run_script("train_gpt.py", tmp_path, *FSDP_2, "--max-steps", "4", "--ckpt-path", "last")
    assert run.returncode != 0 and not marker.exists()
    assert f"{checkpoint}/{data_file} holds an entry (optimizers.0.param_groups" in run.output
    assert "asks to run code when it is read (WeightsUnpickler error: Unsupported global: GLOBAL io.open" in run.output
