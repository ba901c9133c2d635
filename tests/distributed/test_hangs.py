"""Hangs end by themselves and name the rank the others wait for (``shardtrain.launch.heartbeat``): 2 real ranks
under DDP and FSDP, one of which stops at step 3 in a sleep, in a data read, or in a collective the other skips.

With ``hang_timeout_seconds=8`` rank 0 sees no progress, gathers every rank's stack through the store, prints one
report (also ``hang_report.txt``) and the run ends with exit code 124; with only the collective timeout, the rank
whose collective timed out writes the report before it fails."""

import time

import pytest

from tests.distributed.runner import run_script

pytestmark = pytest.mark.distributed

HANG_TIMEOUT = 8
SLEEP_LINE = "time.sleep(1000)  # rank 1 stuck outside any collective"
READ_LINE = "time.sleep(1000)  # rank 1 stuck reading a sample"


def _hang(tmp_path, strategy, where, *, hang_timeout=HANG_TIMEOUT, timeout=60, torchrun=None):
    start = time.monotonic()
    run = run_script(
        "hang.py", tmp_path, "--strategy", strategy, "--where", where,
        "--hang-timeout", str(hang_timeout), "--timeout", str(timeout), timeout=timeout + 120, torchrun=torchrun,
    )  # fmt: skip
    return run, time.monotonic() - start


@pytest.mark.parametrize(
    "strategy, where, line, torchrun",
    [
        pytest.param("ddp", "sleep", SLEEP_LINE, None, marks=pytest.mark.fast),
        ("fsdp", "sleep", SLEEP_LINE, None),
        ("ddp", "data", READ_LINE, None),
        ("fsdp", "data", READ_LINE, None),
        ("ddp", "sleep", SLEEP_LINE, 2),  # under torchrun: the store is its agent's
    ],
    ids=["ddp-sleep", "fsdp-sleep", "ddp-data", "fsdp-data", "torchrun-ddp-sleep"],
)
def test_a_stuck_rank_is_named_with_its_stack_line_and_the_run_ends(tmp_path, strategy, where, line, torchrun):
    run, seconds = _hang(tmp_path, strategy, where, torchrun=torchrun)
    assert run.returncode != 0 if torchrun else run.returncode == 124, run.output[-3000:]
    assert seconds < HANG_TIMEOUT + 60
    report = (tmp_path / "hang_report.txt").read_text()
    assert report.strip() in run.output
    assert "[shardtrain] the others wait for rank 1: not in a collective (in code of its own)" in report
    phase = "training_step" if where == "sleep" else "data"
    assert f"rank 1: step 3, {phase}, in " in report and f"{line}  <- stuck" in report
    assert "rank 0: step 3, training_step, in " in report  # waiting in the backward's collective


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_collective_one_rank_skips_shows_where_each_rank_waits(tmp_path, strategy):
    run, seconds = _hang(tmp_path, strategy, "collective")
    assert run.returncode == 124 and seconds < HANG_TIMEOUT + 60, run.output[-3000:]
    report = (tmp_path / "hang_report.txt").read_text()
    assert "the ranks wait in different PyTorch calls: a collective that some ranks called" in report
    assert "rank 0: step 3, training_step, in barrier, called from " in report
    assert "dist.barrier()  # a collective rank 1 skips" in report


def test_a_collective_timeout_reports_the_rank_it_waited_for(tmp_path):
    """No hang timeout before it: rank 0's all-reduce times out after 15 s and its report names rank 1."""
    run, seconds = _hang(tmp_path, "ddp", "sleep", hang_timeout=600, timeout=15)
    assert run.returncode != 0 and seconds < 15 + 60, run.output[-3000:]
    assert "[shardtrain] hang: rank 0's collective timed out (" in run.output
    assert f"{SLEEP_LINE}  <- stuck" in run.output


def test_a_loop_on_the_engine_that_reports_its_progress_gets_the_report(tmp_path):
    start = time.monotonic()
    run = run_script(
        "hang.py", tmp_path, "--engine", "--strategy", "ddp", "--where", "sleep", "--hang-timeout", "8",
        "--timeout", "60", timeout=180,
    )  # fmt: skip
    assert run.returncode == 124 and time.monotonic() - start < 8 + 60, run.output[-3000:]
    report = (tmp_path / "hang_report.txt").read_text()
    assert "the others wait for rank 1: not in a collective" in report
    assert "rank 1: step 3, step, in " in report and "time.sleep(1000)  # rank 1 stuck in a loop of its own" in report


def test_a_healthy_run_with_a_short_hang_timeout_is_not_stopped(tmp_path):
    """8 quick steps, then 6 s of the script's own work after fit on both ranks, with hang_timeout_seconds=3."""
    run, _ = _hang(tmp_path, "ddp", "nowhere", hang_timeout=3)
    assert run.returncode == 0, run.output[-3000:]
    assert not (tmp_path / "hang_report.txt").exists()
