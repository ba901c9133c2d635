"""Stopping a run cleanly when the cluster asks: catch the signal, agree on a step, save, exit.

A scheduler about to take the machines away sends a signal first (SLURM: ``--signal=USR1@90``
or SIGTERM at the end of the time limit; Kubernetes and torchrun: SIGTERM). The handlers here
only record it. The Trainer carries that record in the all-reduce it already makes at logging
steps (or every ``check_every_n_steps``), so all ranks stop after the same optimizer step
without an extra collective per step, even when only one rank got the signal. Then it saves a
checkpoint, asks SLURM to requeue the job (``auto_requeue``) and raises :class:`Preempted`: a
``SystemExit`` with exit code 75 (``EX_TEMPFAIL``, "try again later"), so that a job script
can tell preemption from success (0) and failure (1). The next run resumes with
``ckpt_path="last"``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Mapping, NoReturn, Sequence

import torch

from shardtrain.errors import ConfigError

log = logging.getLogger(__name__)

#: The exit code of a run stopped by a preemption signal (sysexits.h ``EX_TEMPFAIL``).
EXIT_CODE_PREEMPTED = 75


@dataclass(frozen=True)
class Preemption:
    """What the Trainer does when the cluster asks the run to stop.

    Args:
        signals: the signals that mean "save and stop" (names such as ``"SIGUSR1"``); empty
            to leave every signal's default action alone.
        auto_requeue: under SLURM, requeue the job (``scontrol requeue``) once the checkpoint
            is committed, so that it starts again and resumes with ``ckpt_path="last"``.
        check_every_n_steps: how often the ranks agree on whether to stop. ``None`` (default):
            at logging steps (``log_every_n_steps``), inside the all-reduce that logging makes
            anyway, at no extra cost. An int adds one small all-reduce every that many steps;
            use it when the time between the signal and the kill is shorter than
            ``log_every_n_steps`` steps.
    """

    signals: Sequence[str] = ("SIGTERM", "SIGUSR1")
    auto_requeue: bool = True
    check_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.signals, str):
            raise ConfigError(
                f"Preemption(signals=...) takes a list of names, got the string {self.signals!r}; write [{self.signals!r}]"
            )
        numbers = [_signal_number(name) for name in self.signals]
        if signal.SIGKILL in numbers or signal.SIGSTOP in numbers:
            raise ConfigError(
                "SIGKILL and SIGSTOP cannot be caught; list the signal your scheduler sends before them (SIGTERM, SIGUSR1)"
            )
        if self.check_every_n_steps is not None and (
            not isinstance(self.check_every_n_steps, int) or self.check_every_n_steps < 1
        ):
            raise ConfigError(
                f"check_every_n_steps must be None (at logging steps) or a whole number >= 1, got {self.check_every_n_steps!r}"
            )
        object.__setattr__(self, "signals", tuple(number.name for number in numbers))

    @property
    def signal_numbers(self) -> tuple[signal.Signals, ...]:
        return tuple(signal.Signals[name] for name in self.signals)


def _signal_number(name: str | int) -> signal.Signals:
    try:
        if isinstance(name, int):
            return signal.Signals(name)
        upper = name.upper()
        return signal.Signals[upper if upper.startswith("SIG") else f"SIG{upper}"]
    except (KeyError, ValueError):
        raise ConfigError(
            f"unknown signal {name!r} in Preemption(signals=...); use names such as 'SIGTERM', 'SIGUSR1', 'SIGUSR2'"
        ) from None


class Preempted(SystemExit):
    """Raised by ``Trainer.fit`` on every rank after a preemption checkpoint; exits with code 75."""

    def __init__(self, step: int, reason: str, checkpoint: Path, requeued: bool) -> None:
        super().__init__(EXIT_CODE_PREEMPTED)
        self.step = step
        self.reason = reason
        self.checkpoint = checkpoint
        self.requeued = requeued

    def __str__(self) -> str:
        requeue = "; the SLURM job was requeued" if self.requeued else ""
        return f"preempted ({self.reason}) after step {self.step}: saved {self.checkpoint}{requeue}; resume with ckpt_path='last'"


class SignalCatcher:
    """Records the first of ``signals`` that arrives; restores the previous handlers on ``uninstall``."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            if self.signals:
                log.warning(
                    "preemption signals are not caught: Python handles signals only in the main thread, and fit() runs in another"
                )
            return
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._record)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _record(self, number: int, frame: FrameType | None) -> None:
        # Only an assignment: safe wherever the signal lands, including inside a collective.
        if self.received is None:
            self.received = signal.Signals(number).name

    @property
    def requested(self) -> bool:
        return self.received is not None


def running_under_slurm_batch(env: Mapping[str, str] | None = None) -> bool:
    """True inside a SLURM batch job (not an interactive ``salloc``/``srun --pty`` shell)."""
    env = os.environ if env is None else env
    return "SLURM_JOB_ID" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def requeue_slurm_job(env: Mapping[str, str] | None = None) -> bool:
    """``scontrol requeue`` this job (or array task); returns whether SLURM accepted it."""
    env = os.environ if env is None else env
    job = env["SLURM_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        log.warning("auto_requeue: scontrol is not on PATH; job %s was not requeued", job)
        return False
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        log.warning(
            "auto_requeue: `scontrol requeue %s` failed (exit %d): %s", job, result.returncode, result.stderr.strip()
        )
        return False
    return True


class StopAgreement:
    """A stop signal caught on any rank, agreed on by every rank at a step, and the exit that follows.

    The flag rides on the logging all-reduce (``flag``), or on one small all-reduce every
    ``Preemption.check_every_n_steps`` steps; then every rank saves and exits at the same step.
    """

    def __init__(self, preemption: Preemption | None) -> None:
        self.preemption = preemption
        self.signals = SignalCatcher(())
        self.agreed = False

    def install(self) -> None:
        self.signals = SignalCatcher(self.preemption.signal_numbers if self.preemption else ())
        self.signals.install()
        self.agreed = False

    def uninstall(self) -> None:
        self.signals.uninstall()

    def flag(self, device: torch.device) -> torch.Tensor:
        """1 where this rank caught a signal; reduced with ``max`` over the ranks."""
        return torch.tensor(1.0 if self.signals.requested else 0.0, device=device)

    def check_due(self, step: int) -> bool:
        """Whether ``step`` has its own agreement all-reduce (it is not a logging step)."""
        every = self.preemption.check_every_n_steps if self.preemption is not None else 0
        return bool(every) and step % every == 0

    def stop(self, step: int, rank: int, save: Callable[[], Path]) -> NoReturn:
        """Every rank agreed to stop after ``step``: ``save()`` (returns the checkpoint), requeue, exit with code 75."""
        assert self.preemption is not None
        reason = (
            f"{self.signals.received} on rank {rank}"
            if self.signals.requested
            else "a stop signal received by another rank"
        )
        path = save()
        requeued = False
        if self.preemption.auto_requeue and rank == 0 and running_under_slurm_batch():
            requeued = requeue_slurm_job()
        preempted = Preempted(step, reason, path, requeued)
        if rank == 0:
            print(f"[shardtrain] {preempted}; exiting with code {preempted.code}", flush=True)
        raise preempted
