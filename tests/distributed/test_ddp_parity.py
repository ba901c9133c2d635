"""DDP over 2 real processes gives the losses of one process on the same global batch."""

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def single(reference_run):
    """One process, global batch 16, no accumulation: the reference curve."""
    return reference_run("train_gpt.py", "--devices", "1", "--batch-size", "16")


@pytest.mark.fast
def test_ddp_matches_single_process(single, tmp_path):
    ddp = assert_ok(
        run_script("train_gpt.py", tmp_path, "--devices", "2", "--strategy", "ddp", "--batch-size", "8")
    ).result()
    assert ddp["world_size"] == 2 and ddp["steps"] == list(range(1, 11))
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert single["losses"][-1] < single["losses"][0] - 1.0, "the loss should fall over 10 steps"
    assert ddp["weight_checksum"] == pytest.approx(single["weight_checksum"], rel=1e-5)


def test_ddp_with_accumulation_matches_single_process(single, tmp_path):
    # 2 ranks x 4 samples x 2 micro-batches = the same 16 samples per optimizer step.
    ddp = assert_ok(
        run_script(
            "train_gpt.py", tmp_path, "--devices", "2", "--strategy", "ddp", "--batch-size", "4", "--accumulate", "2"
        )
    ).result()
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)


def test_clipped_norm_is_the_global_norm(single, tmp_path):
    one = assert_ok(
        run_script("train_gpt.py", tmp_path / "one", "--devices", "1", "--batch-size", "16", "--clip", "0.5")
    ).result()
    two = assert_ok(
        run_script("train_gpt.py", tmp_path / "two", "--devices", "2", "--batch-size", "8", "--clip", "0.5")
    ).result()
    assert min(one["grad_norm_logged"]) > 0.5, "the test needs norms above the clip value"
    assert two["grad_norm_logged"] == pytest.approx(one["grad_norm_logged"], rel=1e-4)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert one["losses"] != pytest.approx(single["losses"], abs=1e-4), "clipping should change the curve"


def test_validation_is_averaged_over_ranks(tmp_path):
    one = assert_ok(
        run_script(
            "train_gpt.py", tmp_path / "one", "--devices", "1", "--batch-size", "16", "--val-check-interval", "5"
        )
    ).result()
    two = assert_ok(
        run_script("train_gpt.py", tmp_path / "two", "--devices", "2", "--batch-size", "8", "--val-check-interval", "5")
    ).result()
    assert sorted(one["val_losses"]) == ["10", "5"]
    # 4 validation batches of 16 samples (one process) and of 2x8 samples: the same 64 samples.
    for step in ("5", "10"):
        assert two["val_losses"][step] == pytest.approx(one["val_losses"][step], abs=1e-5)
