"""Start the other local processes of a run by running the user's command again.

``python train.py`` with ``devices=N`` makes this process rank 0 and starts N-1 copies of the same
command with the rank layout in their environment (the approach of Lightning's script launcher:
it works from any script and needs nothing picklable). A watchdog thread in rank 0 stops the
whole run when a rank dies, so a failure never turns into a hang:

* a child that exits non-zero: rank 0 reports it, terminates the others and exits with code 1
  if it has not failed by itself within ``failure_grace_seconds``;
* rank 0 that dies: the children get SIGKILL from the kernel (``PR_SET_PDEATHSIG``); not
  SIGTERM, which the Trainer catches as a preemption request;
* rank 0 that ends normally waits for its children and exits non-zero if any of them failed.

What the launcher prints names ranks only as it saw them fail, in that order: when several
ranks fail (every rank hits the same error, or one failure brings down the others) it says how
many failed and whose failure it saw first, rather than blaming one rank for output that may be
another's. Which rank *caused* a failure is for the ranks themselves to say
(:class:`~shardtrain.errors.RankFailedError`).

A child that exits with the preemption code (75, see ``shardtrain.preemption``) has not failed:
every rank saved and stopped at the same step, and rank 0 exits with the same code.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from shardtrain.launch.environment import ClusterEnvironment, find_free_port, threads_per_process
from shardtrain.preemption import EXIT_CODE_PREEMPTED

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def user_command() -> list[str]:
    """The command line that started this process, so that it can be started again."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        module = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return [sys.executable, "-m", module, *sys.argv[1:]]
    if not sys.argv or not sys.argv[0] or sys.argv[0] == "-c":
        raise RuntimeError("cannot start more processes from an interactive session or `python -c`")
    return [sys.executable, *sys.argv]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class SubprocessLauncher:
    """Turns this process into local rank 0 and starts local ranks 1..N-1."""

    def __init__(self, environment: ClusterEnvironment, *, failure_grace_seconds: float = 10.0) -> None:
        self.environment = environment
        self.failure_grace_seconds = failure_grace_seconds
        self._children: dict[int, subprocess.Popen] = {}
        self._exiting_with_error = False
        self._reported = False  # the first failure has been announced
        self._lock = threading.Lock()
        self._failures: list[tuple[int, str]] = []  # (local rank, how it failed), in the order seen
        self._killed: set[int] = set()  # local ranks this launcher ended: stopped, not failed

    def launch(self) -> dict[str, str]:
        """Start the children; returns the rank-layout variables now set in this process's environment."""
        env = self.environment
        node_rank = int(os.environ.get("NODE_RANK", env.node_rank))
        port = env.main_port or find_free_port()
        threads = str(threads_per_process(env.local_world_size))
        common = {
            "MASTER_ADDR": env.main_address,
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "GROUP_RANK": str(node_rank),
            "OMP_NUM_THREADS": threads,
            "SHARDTRAIN_LAUNCHER": "local",
        }
        command = user_command()
        for local_rank in range(1, env.local_world_size):
            child_env = {**os.environ, **common, **self._rank_vars(node_rank, local_rank)}
            self._children[local_rank] = subprocess.Popen(command, env=child_env, preexec_fn=_die_with_parent)
        own = {**common, **self._rank_vars(node_rank, 0)}
        os.environ.update(own)
        self._install_exit_handling()
        return own

    def _rank_vars(self, node_rank: int, local_rank: int) -> dict[str, str]:
        rank = node_rank * self.environment.local_world_size + local_rank
        return {"RANK": str(rank), "LOCAL_RANK": str(local_rank)}

    def _install_exit_handling(self) -> None:
        previous_hook = sys.excepthook

        def excepthook(*args: object) -> None:
            self._exiting_with_error = True
            self._note_failure(0, "an uncaught exception")
            previous_hook(*args)  # type: ignore[arg-type]

        sys.excepthook = excepthook
        for local_rank, child in self._children.items():
            # A blocking wait per child: no polling, no GIL taken while training runs.
            threading.Thread(
                target=self._watch_child,
                args=(local_rank, child),
                name=f"shardtrain-watch-rank{local_rank}",
                daemon=True,
            ).start()
        atexit.register(self._wait_for_children)

    def _watch_child(self, local_rank: int, child: subprocess.Popen) -> None:
        code = child.wait()
        if not self._child_failed(local_rank, code) or self._exiting_with_error:
            return
        with self._lock:
            if self._reported:
                return
            self._reported = True
        self._stop_after_child_failure(local_rank, code)

    def _child_failed(self, local_rank: int, code: int) -> bool:
        """Whether a child's exit is a failure (noted, in order); not one this launcher caused."""
        if code in (0, EXIT_CODE_PREEMPTED) or local_rank in self._killed:
            return False
        self._note_failure(local_rank, f"signal {-code}" if code < 0 else f"exit code {code}")
        return True

    def _note_failure(self, local_rank: int, how: str) -> None:
        with self._lock:
            if all(rank != local_rank for rank, _ in self._failures):
                self._failures.append((local_rank, how))

    def _global_rank(self, local_rank: int) -> int:
        return int(os.environ.get("GROUP_RANK", 0)) * self.environment.local_world_size + local_rank

    def _stop_after_child_failure(self, local_rank: int, code: int) -> None:
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        _say(f"rank {self._global_rank(local_rank)} failed ({how}); stopping all ranks. Its output, if any, is above.")
        self._terminate_children()
        # Give rank 0 the chance to fail by itself (a broken collective raises with a traceback);
        # if it is stuck, e.g. in a collective that never returns, end it.
        time.sleep(self.failure_grace_seconds)
        sys.stderr.flush()
        os._exit(1)

    def _report_failures(self) -> None:
        """Say which ranks failed, in the order seen; once the first failure was announced, only
        when more ranks failed after it."""
        with self._lock:
            failures = list(self._failures)
            announced, self._reported = self._reported, True
        if not failures or (announced and len(failures) == 1):
            return
        env = self.environment
        ranks = [(self._global_rank(local_rank), how) for local_rank, how in failures]
        _say(describe_failures(ranks, env.local_world_size, several_nodes=env.world_size > env.local_world_size))

    def _terminate_children(self, timeout: float = 5.0) -> None:
        # SIGKILL: the run is over, and SIGTERM would only ask a preemption checkpoint of a
        # rank whose peers are gone.
        for local_rank, child in self._children.items():
            if child.poll() is None:
                self._killed.add(local_rank)
                child.kill()
        for child in self._children.values():
            child.wait(timeout)

    def _wait_for_children(self) -> None:
        if self._exiting_with_error:
            # A peer's failure is often what made this rank fail: let the others finish exiting
            # (their own errors name the cause), then say who failed.
            deadline = time.monotonic() + 5.0
            for local_rank, child in self._children.items():
                try:
                    self._child_failed(local_rank, child.wait(max(0.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    continue
            self._report_failures()
            self._terminate_children()
            return
        codes = {local_rank: child.wait() for local_rank, child in self._children.items()}
        failed = [local_rank for local_rank, code in codes.items() if self._child_failed(local_rank, code)]
        if failed:
            self._report_failures()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def describe_failures(failures: Sequence[tuple[int, str]], local_ranks: int, several_nodes: bool = False) -> str:
    """One line naming the failed ranks, ``(global rank, how)``, in the order this launcher saw them fail.

    e.g. ``all 2 ranks failed. In the order this launcher saw them: rank 1 failed (exit code 1),
    then rank 0 failed (an uncaught exception). ...``: no rank is blamed for another's output.
    """
    (first, first_how), *rest = failures
    if not rest:
        return f"rank {first} failed ({first_how}); its output, if any, is above."
    where = " on this node" if several_nodes else ""
    count = f"all {local_ranks}" if len(failures) == local_ranks else f"{len(failures)} of {local_ranks}"
    then = "".join(f", then rank {rank} failed ({how})" for rank, how in rest)
    return (
        f"{count} ranks{where} failed. In the order this launcher saw them: rank {first} failed ({first_how}){then}. "
        "Each rank's output, if any, is above."
    )


def _say(message: str) -> None:
    print(f"[shardtrain] {message}", file=sys.stderr, flush=True)


def launch_local_processes(environment: ClusterEnvironment) -> Sequence[str]:
    """Start the local processes of ``environment``; a no-op when they already exist."""
    if environment.processes_started:
        return []
    return list(SubprocessLauncher(environment).launch())
