"""Run a script that starts its own ranks (through shardtrain's launcher or torchrun) and read what it wrote.

Scripts write their results as JSON files into ``--out``; tests assert numbers from those files.
No part of torch.distributed is mocked: the ranks are real processes talking over gloo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from shardtrain.launch.environment import find_free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
#: What a launcher sets; removed from a test's environment so that no outer layout leaks in.
LAYOUT_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
)


@dataclass
class Run:
    returncode: int
    output: str
    out_dir: Path

    def result(self, name: str = "result.json") -> Any:
        path = self.out_dir / name
        assert path.is_file(), f"{name} was not written; output:\n{self.output[-4000:]}"
        return json.loads(path.read_text())


def run_script(
    script: str,
    out_dir: Path,
    *args: str,
    timeout: float = 180,
    torchrun: int | None = None,
    torchrun_args: Sequence[str] = (),
    env: dict | None = None,
) -> Run:
    """Run ``scripts/<script>`` with ``--out out_dir``; with ``torchrun=N`` under ``torchrun --nproc-per-node N [torchrun_args]``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPTS / script), "--out", str(out_dir), *args]
    if torchrun:
        port = find_free_port()
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={torchrun}",
            f"--master-port={port}",
            *torchrun_args,
            *command[1:],
        ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    for key in LAYOUT_VARIABLES:
        full_env.pop(key, None)
    returncode, output = run_process_group(command, env=full_env, timeout=timeout)
    return Run(returncode, output, out_dir)


def run_process_group(command: Sequence[str], *, env: dict | None = None, timeout: float = 180) -> tuple[int, str]:
    """Run ``command`` in its own session and return (exit code, stdout + stderr).

    On timeout the whole process group is killed, not just the launcher: ranks left behind would keep
    the CPU busy (or a file lock held) for the tests that follow. The exit code is then -9 and the
    output ends with a line saying so.
    """
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -signal.SIGKILL, f"{output}\n[killed with its process group: timed out after {timeout:.0f} s]\n"
    return process.returncode, output


def assert_ok(run: Run) -> Run:
    assert run.returncode == 0, f"exit code {run.returncode}; output:\n{run.output[-6000:]}"
    return run
