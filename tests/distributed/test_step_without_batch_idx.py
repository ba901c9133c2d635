"""A module written with ``training_step(self, batch)`` / ``validation_step(self, batch)`` trains
under FSDP on 2 ranks exactly as in one process."""

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed


def test_fsdp_on_two_ranks_matches_one_process(tmp_path):
    one = assert_ok(run_script("step_without_batch_idx.py", tmp_path / "one")).result()
    two = assert_ok(
        run_script(
            "step_without_batch_idx.py", tmp_path / "two", "--devices", "2", "--strategy", "fsdp", "--batch-size", "8"
        )
    ).result()
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-6)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
