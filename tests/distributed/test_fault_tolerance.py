"""Faults injected into real runs: preemption signals, a rank SIGKILLed under torchrun --max-restarts,
an exception on one rank. Each test asserts the resumed weights against an uninterrupted run, or
the exit code and the message, within a bounded time."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from shardtrain.launch.environment import find_free_port
from shardtrain.preemption import EXIT_CODE_PREEMPTED
from tests.distributed.runner import LAYOUT_VARIABLES, ROOT, SCRIPTS, assert_ok, run_script

pytestmark = pytest.mark.distributed

FSDP = ("--strategy", "fsdp", "--max-steps", "12")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """12 FSDP steps on 2 processes, logging every step: the losses and weights to match."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return assert_ok(run_script("train_gpt.py", out, "--devices", "2", *FSDP)).result()


def _losses_by_step(result):
    return dict(zip(result["steps"], result["losses"]))


def _assert_resumes_exactly(resumed, uninterrupted):
    expected = _losses_by_step(uninterrupted)
    for step, loss in _losses_by_step(resumed).items():
        assert loss == pytest.approx(expected[step], abs=1e-6), f"step {step}"
    assert resumed["weight_checksum"] == pytest.approx(uninterrupted["weight_checksum"], abs=1e-9)


def test_sigterm_to_rank_0_saves_at_the_next_logging_step_and_resumes_exactly(uninterrupted, tmp_path):
    # SIGTERM reaches only rank 0 (our launcher's parent process) after step 5; logging every 4
    # steps, the ranks agree inside step 8's logging all-reduce and stop there.
    started = time.monotonic()
    run = run_script(
        "train_gpt.py",
        tmp_path,
        "--devices",
        "2",
        *FSDP,
        "--log-every",
        "4",
        "--signal-at-step",
        "5",
        "--send-signal",
        "SIGTERM",
        "--signal-rank",
        "0",
    )
    exited = time.time()
    assert run.returncode == EXIT_CODE_PREEMPTED, run.output[-4000:]
    assert "preempted (SIGTERM on rank 0) after step 8" in run.output
    assert "rank 1 failed" not in run.output  # a preempted child is not a failure
    assert (tmp_path / "checkpoints" / "last").read_text() == "step=8"
    sent = json.loads((tmp_path / "signal_sent.json").read_text())
    assert exited - sent["time"] < 20, "from the signal to the exit (3 steps, a save, the exit)"
    assert time.monotonic() - started < 90

    resumed = assert_ok(run_script("train_gpt.py", tmp_path, "--devices", "2", *FSDP, "--ckpt-path", "last")).result()
    assert resumed["steps"] == [9, 10, 11, 12]
    _assert_resumes_exactly(resumed, uninterrupted)


def test_a_signal_to_rank_1_only_stops_every_rank_at_the_same_step(uninterrupted, tmp_path):
    # check_every_n_steps=1: a small all-reduce every step, so the stop comes right after the signal.
    options = json.dumps({"signals": ["SIGUSR1"], "check_every_n_steps": 1})
    run = run_script(
        "train_gpt.py",
        tmp_path,
        "--devices",
        "2",
        *FSDP,
        "--log-every",
        "50",
        "--preemption",
        options,
        "--signal-at-step",
        "5",
        "--send-signal",
        "SIGUSR1",
        "--signal-rank",
        "1",
    )
    assert run.returncode == EXIT_CODE_PREEMPTED, run.output[-4000:]
    assert "preempted (a stop signal received by another rank) after step 6" in run.output
    assert (tmp_path / "checkpoints" / "last").read_text() == "step=6"
    resumed = assert_ok(run_script("train_gpt.py", tmp_path, "--devices", "2", *FSDP, "--ckpt-path", "last")).result()
    assert resumed["steps"][0] == 7
    _assert_resumes_exactly(resumed, uninterrupted)


def test_without_preemption_handling_sigterm_ends_the_run_without_a_checkpoint(tmp_path):
    run = run_script(
        "train_gpt.py",
        tmp_path,
        "--devices",
        "2",
        *FSDP,
        "--preemption",
        "off",
        "--signal-at-step",
        "3",
        "--send-signal",
        "SIGTERM",
        "--signal-rank",
        "0",
    )
    assert run.returncode not in (0, EXIT_CODE_PREEMPTED)
    assert not (tmp_path / "checkpoints" / "last").exists()


def test_slurm_preemption_requeues_the_job(tmp_path):
    """Two tasks started as srun starts them (SLURM_* variables, no launcher of ours); the signal
    goes to task 1 only, as ``srun --signal`` may deliver it; ``scontrol`` is a stand-in on PATH
    that records its arguments (no SLURM on this machine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls.txt"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "run"
    out.mkdir()
    port = str(find_free_port())
    base = {k: v for k, v in os.environ.items() if k not in LAYOUT_VARIABLES}
    base.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="gpt",
        SLURM_NTASKS="2",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_JOB_NODELIST="127.0.0.1",
        MASTER_PORT=port,
    )
    command = [
        sys.executable,
        str(SCRIPTS / "train_gpt.py"),
        "--out",
        str(out),
        "--devices",
        "2",  # SLURM's tasks per node: a different number is refused
        *FSDP,
        "--preemption",
        json.dumps({"check_every_n_steps": 1}),
        "--signal-at-step",
        "4",
        "--send-signal",
        "SIGUSR1",
        "--signal-rank",
        "1",
    ]
    tasks = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [task.communicate(timeout=120)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [EXIT_CODE_PREEMPTED] * 2, outputs[0][-3000:] + outputs[1][-3000:]
    assert "the SLURM job was requeued" in outputs[0]
    assert (tmp_path / "scontrol_calls.txt").read_text().split("\n")[:-1] == ["requeue 4242"]  # once, from rank 0
    assert (out / "checkpoints" / "last").read_text() == "step=5"


def test_a_rank_killed_under_torchrun_max_restarts_resumes_from_the_last_commit(uninterrupted, tmp_path):
    """Rank 1 is SIGKILLed after step 7 of the first attempt; torchrun restarts both ranks, which
    resume from step 6 (checkpoints every 3 steps) and finish with the uninterrupted weights.
    Static rendezvous (``--master-port``): its store outlives a restart (see process_group)."""
    run = assert_ok(
        run_script(
            "train_gpt.py",
            tmp_path,
            "--devices",
            "2",  # what torchrun starts: a different number is refused
            *FSDP,
            "--checkpoint-every",
            "3",
            "--ckpt-path",
            "last",
            "--signal-at-step",
            "7",
            "--send-signal",
            "SIGKILL",
            "--signal-rank",
            "1",
            torchrun=2,
            torchrun_args=("--max-restarts=1",),
            timeout=150,
        )
    )
    killed = json.loads((tmp_path / "signal_sent.json").read_text())
    restarted = json.loads((tmp_path / "train_start_attempt1.json").read_text())
    assert restarted["step"] == 6, "resumed from the last committed checkpoint"
    assert restarted["time"] - killed["time"] < 30, "detection, restart and resume"
    result = run.result()
    assert result["steps"] == [7, 8, 9, 10, 11, 12]
    _assert_resumes_exactly(result, uninterrupted)


@pytest.mark.fast
def test_torchrun_reports_the_failing_rank_and_its_traceback(tmp_path):
    run = run_script("fail_rank.py", tmp_path, "--fail-rank", "1", torchrun=2, timeout=120)
    assert run.returncode != 0
    root_cause = run.output.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 1" in root_cause and "planted failure on rank 1" in root_cause, root_cause
    # rank 0's own error names rank 1 and carries its traceback, instead of "Connection closed by peer" alone
    assert "RankFailedError: rank 1 failed first" in run.output


@pytest.mark.parametrize("mode", ["stop", "skip", "ignore"])
def test_a_nan_loss_on_one_rank(tmp_path, mode):
    """Rank 1's loss is NaN at step 4 (0-based batch 3) of 8."""
    run = run_script(
        "fail_rank.py",
        tmp_path,
        "--how",
        "nan",
        "--fail-rank",
        "1",
        "--max-steps",
        "8",
        "--on-nonfinite",
        mode,
        timeout=120,
    )
    if mode == "stop":
        assert run.returncode != 0
        assert "NonFiniteError: step 4: the loss is nan on rank 1 and the gradient norm is nan." in run.output
        assert not (tmp_path / "rank0.json").exists()
        return
    assert_ok(run)
    ranks = [run.result(f"rank{rank}.json") for rank in (0, 1)]
    assert [r["global_step"] for r in ranks] == [8, 8]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    if mode == "skip":
        assert (
            "step 4: the loss is nan on rank 1 and the gradient norm is nan; the optimizer step was skipped (1 so far)"
            in run.output
        )
        assert [r["skipped_steps"] for r in ranks] == [1, 1] and ranks[0]["finite"]
    else:  # what the option prevents: one NaN step ruins the weights on every rank
        assert not ranks[0]["finite"]
