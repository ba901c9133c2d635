"""Preemption settings, the signal catcher with real signals, and the SLURM requeue command."""

import os
import signal
import stat

import pytest

from shardtrain import ConfigError, Preempted, Preemption
from shardtrain.preemption import EXIT_CODE_PREEMPTED, SignalCatcher, requeue_slurm_job, running_under_slurm_batch


def test_signal_names_are_normalised():
    assert Preemption(signals=["usr1", "SIGTERM", int(signal.SIGUSR2)]).signals == ("SIGUSR1", "SIGTERM", "SIGUSR2")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"signals": ["SIGFOO"]}, "unknown signal 'SIGFOO'"),
        ({"signals": ["SIGKILL"]}, "SIGKILL and SIGSTOP cannot be caught"),
        ({"signals": "SIGTERM"}, r"takes a list of names.*\['SIGTERM'\]"),
        ({"check_every_n_steps": 0}, "check_every_n_steps must be None"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Preemption(**kwargs)


def test_the_catcher_records_a_real_signal_and_restores_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: seen.append("user handler"))
    try:
        catcher = SignalCatcher([signal.SIGUSR1])
        catcher.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert catcher.requested and catcher.received == "SIGUSR1" and seen == []
        catcher.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == ["user handler"]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_preempted_is_a_system_exit_with_its_own_code(tmp_path):
    error = Preempted(8, "SIGTERM on rank 0", tmp_path / "step=8", requeued=True)
    assert isinstance(error, SystemExit) and error.code == EXIT_CODE_PREEMPTED == 75
    assert "after step 8" in str(error) and "requeued" in str(error) and "ckpt_path='last'" in str(error)


def _fake_scontrol(tmp_path, exit_code=0):
    script = tmp_path / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": str(tmp_path)}


def test_requeue_names_the_job_or_the_array_task(tmp_path):
    env = _fake_scontrol(tmp_path)
    assert requeue_slurm_job({**env, "SLURM_JOB_ID": "77"})
    assert requeue_slurm_job({**env, "SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"})
    assert (tmp_path / "calls").read_text().splitlines() == ["requeue 77", "requeue 70_3"]


def test_a_refused_or_impossible_requeue_is_reported_not_raised(tmp_path):
    assert not requeue_slurm_job({**_fake_scontrol(tmp_path, exit_code=1), "SLURM_JOB_ID": "77"})
    assert not requeue_slurm_job({"PATH": str(tmp_path / "nothing"), "SLURM_JOB_ID": "77"})


def test_interactive_slurm_shells_are_not_batch_jobs():
    assert running_under_slurm_batch({"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "train"})
    assert not running_under_slurm_batch({"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "bash"})
    assert not running_under_slurm_batch({})
