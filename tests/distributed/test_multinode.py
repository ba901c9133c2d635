"""Two nodes on one machine (loopback): `shardtrain fit` once per node, and torchrun --nnodes 2 with c10d.

Each "node" is a separate launcher invocation sharing only the main address and port, as on
two machines; both write to the same default_root_dir, as nodes do on a shared filesystem. A
run on two nodes must train to the same losses as one node with the same number of processes.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardtrain.launch.environment import find_free_port
from tests.distributed.runner import LAYOUT_VARIABLES, ROOT

pytestmark = pytest.mark.distributed
CONFIG = ROOT / "tests" / "distributed" / "configs" / "tiny.yaml"
STEPS = 6


def _fit(root: Path, *args: object) -> list[str]:
    """The `shardtrain fit` command of the tiny config, cut to STEPS steps, writing into ``root``."""
    return [
        "-m",
        "shardtrain",
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.default_root_dir",
        str(root),
        *map(str, args),
    ]


def _clean_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in LAYOUT_VARIABLES:
        env.pop(key, None)
    return env


def _run_together(commands: list[list[str]], logs: Path, timeout: float = 120) -> list[str]:
    """Start every command at once (one per node), wait for all; returns their outputs, asserting exit code 0."""
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[tuple[subprocess.Popen, Path]] = []
    for index, command in enumerate(commands):
        log = logs / f"node{index}.log"
        with open(log, "w") as handle:
            # Own session: on a timeout the whole node (launcher and its ranks) is killed at once.
            processes.append(
                (
                    subprocess.Popen(
                        [sys.executable, *command],
                        cwd=ROOT,
                        env=_clean_env(),
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    ),
                    log,
                )
            )
    deadline = time.monotonic() + timeout
    try:
        for process, _ in processes:
            process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process, _ in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        pytest.fail(
            f"the nodes did not finish within {timeout} s:\n"
            + "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in processes)
        )
    outputs = [log.read_text() for _, log in processes]
    for (process, log), output in zip(processes, outputs):
        assert process.returncode == 0, f"{log.name} exited with {process.returncode}:\n{output[-6000:]}"
    return outputs


def _losses(directory: Path) -> list[float]:
    rows = [row for row in csv.DictReader(open(directory / "metrics.csv")) if row.get("train_loss")]
    assert [int(row["step"]) for row in rows] == list(range(STEPS))  # Lightning's steps: from 0
    return [float(row["train_loss"]) for row in rows]


def _layout_lines(output: str) -> list[str]:
    return [
        line.removeprefix("[shardtrain] ").rsplit(", main", 1)[0]
        for line in output.splitlines()
        if line.startswith("[shardtrain] node ")
    ]


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory):
    """Losses of the same run on one node with ``devices`` processes (each computed once)."""
    cache: dict[int, list[float]] = {}

    def losses(devices: int) -> list[float]:
        if devices not in cache:
            root = tmp_path_factory.mktemp(f"one_node_{devices}")
            _run_together([_fit(root, "--trainer.devices", devices)], root / "logs")
            cache[devices] = _losses(root)
        return cache[devices]

    return losses


@pytest.mark.parametrize("devices", [1, 2])
def test_two_nodes_from_the_cli_train_like_one_node(tmp_path, one_node_losses, devices):
    port = find_free_port()
    nodes = [
        _fit(
            tmp_path / "run",
            "--trainer.devices",
            devices,
            "--num-nodes",
            2,
            "--node-rank",
            rank,
            "--main-address",
            "127.0.0.1",
            "--main-port",
            port,
        )
        for rank in (0, 1)
    ]
    outputs = _run_together(nodes, tmp_path / "logs")
    world = 2 * devices
    assert _layout_lines(outputs[0]) == [f"node 0 of 2 (local): ranks 0-{devices - 1} of {world}"]
    assert _layout_lines(outputs[1]) == [f"node 1 of 2 (local): ranks {devices}-{world - 1} of {world}"]
    assert _losses(tmp_path / "run") == pytest.approx(one_node_losses(world), abs=1e-5)
    assert "num_nodes: 2" in (tmp_path / "run" / "config.yaml").read_text()


def test_two_torchrun_nodes_with_c10d_rendezvous(tmp_path, one_node_losses):
    port = find_free_port()
    torchrun = [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "multinode-test",
    ]
    command = [*torchrun, *_fit(tmp_path / "run", "--trainer.devices", 1, "--num-nodes", 2)]
    outputs = _run_together([command, command], tmp_path / "logs")
    # c10d numbers the nodes in the order they join, so either invocation may be node 0.
    assert sorted(line for output in outputs for line in _layout_lines(output)) == [
        "node 0 of 2 (torchrun): ranks 0-0 of 2",
        "node 1 of 2 (torchrun): ranks 1-1 of 2",
    ]
    assert _losses(tmp_path / "run") == pytest.approx(one_node_losses(2), abs=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-nodes", "2", "--node-rank", "0", "--main-address", "127.0.0.1"], "pass --main-port PORT"),
        (
            ["--num-nodes", "2", "--node-rank", "2", "--main-address", "127.0.0.1", "--main-port", "29500"],
            "number the nodes 0 to 1",
        ),
        (["--num-nodes", "2", "--node-rank", "1", "--main-port", "29500"], "pass --main-address HOST"),
    ],
)
def test_bad_node_flags_stop_before_any_process_starts(tmp_path, flags, message):
    completed = subprocess.run(
        [sys.executable, *_fit(tmp_path, *flags)],
        cwd=ROOT,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2 and message in completed.stderr, completed.stderr
    assert "Traceback" not in completed.stderr and not (tmp_path / "metrics.csv").exists()
