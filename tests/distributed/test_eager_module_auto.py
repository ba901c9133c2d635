"""A module with its layers built in ``__init__`` trains with the default ``strategy="auto"``: ``single`` on one
process, ``ddp`` on two (a small model), with the same losses; its optimizer_step (a warm-up) and prepare_data run."""

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed


@pytest.mark.fast
def test_auto_trains_an_eager_module_on_one_and_two_processes(tmp_path):
    one = assert_ok(run_script("eager_module_auto.py", tmp_path / "one")).result()
    two = assert_ok(
        run_script("eager_module_auto.py", tmp_path / "two", "--devices", "2", "--batch-size", "8")
    ).result()
    assert (one["strategy"], one["world_size"]) == ("single", 1)
    assert (two["strategy"], two["world_size"]) == ("ddp", 2)
    assert len(one["losses"]) == 12
    assert one["losses"][-1] < 0.8 * one["losses"][0]  # 0.58 -> 0.42 in 12 SGD steps
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-6)
    assert one["lrs"] == two["lrs"] == [0.1 * min(1.0, s / 4) for s in range(1, 13)]  # optimizer_step was called
    assert one["prepared"] == two["prepared"] == 1  # prepare_data ran once per node, before setup on every rank
