"""Stragglers are named (``StragglerMonitor``): 2 real ranks under DDP and FSDP, one of whose datasets sleeps 50 ms
per sample (0.2 s per batch of 4), so every step waits for its batch. Logged every 4 steps; named after 2 windows."""

import csv

import pytest

from tests.distributed.runner import assert_ok, run_script

pytestmark = pytest.mark.distributed


def _rows(out):
    with open(out / "metrics.csv") as handle:
        return [row for row in csv.DictReader(handle) if row.get("stragglers/slowest_rank")]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_rank_whose_data_comes_late_is_named_a_straggler(tmp_path, strategy):
    run = assert_ok(run_script("straggler.py", tmp_path, "--strategy", strategy, "--slow-rank", "1"))
    assert "rank 1 is a straggler: for 2 logging windows it waited 0.2" in run.output
    rows = _rows(tmp_path)
    assert rows and all(row["stragglers/slowest_rank"] == "1.0" for row in rows)
    assert rows[-1]["stragglers/straggler"] == "1.0"
    assert 0.18 < float(rows[-1]["stragglers/data_wait_max"]) < 0.3  # 4 samples x 50 ms
    assert float(rows[-1]["stragglers/data_wait_median"]) < 0.02  # rank 0's batches are ready at once


def test_ranks_equally_slow_are_not_named(tmp_path):
    """Both datasets sleep 25 ms per sample: slow steps, but no rank keeps the other waiting."""
    run = assert_ok(run_script("straggler.py", tmp_path, "--strategy", "ddp", "--slow-rank", "-1", "--delay", "0.025"))
    assert "straggler:" not in run.output
    rows = _rows(tmp_path)
    assert rows and all(row["stragglers/straggler"] == "-1.0" for row in rows)
