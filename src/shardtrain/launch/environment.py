"""Where the processes of a run come from, read from the environment.

Three sources, checked in this order:

* **torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): we use its layout.
* **SLURM** (``srun``): ranks from ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NODEID``; the main
  address is the first host of ``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set.
* **local**: nothing set; shardtrain starts ``devices`` processes itself (see ``subprocess_launcher``).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterEnvironment:
    """The rank layout of this process, and where the rendezvous happens."""

    source: str  # "local", "torchrun" or "slurm"
    global_rank: int
    local_rank: int
    node_rank: int
    world_size: int
    local_world_size: int
    main_address: str
    main_port: int
    #: True when the processes already exist (torchrun, SLURM, or a child we started).
    processes_started: bool


def detect_environment(devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> ClusterEnvironment:
    """Read the rank layout for a run of ``devices`` processes per node on ``num_nodes`` nodes."""
    env = os.environ if env is None else env
    if _is_torchrun(env):
        return _from_torchrun(env)
    if _is_slurm(env):
        return _from_slurm(env)
    return ClusterEnvironment(
        source="local",
        global_rank=0,
        local_rank=0,
        node_rank=0,
        world_size=devices * num_nodes,
        local_world_size=devices,
        main_address=env.get("MASTER_ADDR", "127.0.0.1"),
        main_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 0,
        processes_started=devices * num_nodes == 1,
    )


def _is_torchrun(env: Mapping[str, str]) -> bool:
    return all(key in env for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _from_torchrun(env: Mapping[str, str]) -> ClusterEnvironment:
    world_size = int(env["WORLD_SIZE"])
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    rank = int(env["RANK"])
    return ClusterEnvironment(
        source=env.get("SHARDTRAIN_LAUNCHER", "torchrun"),
        global_rank=rank,
        local_rank=int(env["LOCAL_RANK"]),
        node_rank=int(env.get("GROUP_RANK", rank // max(local_world_size, 1))),
        world_size=world_size,
        local_world_size=local_world_size,
        main_address=env["MASTER_ADDR"],
        main_port=int(env["MASTER_PORT"]),
        processes_started=True,
    )


def _is_slurm(env: Mapping[str, str]) -> bool:
    # An interactive `salloc` shell has SLURM_* set but one task: that is a local run.
    return "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _from_slurm(env: Mapping[str, str]) -> ClusterEnvironment:
    world_size = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
    job_id = int(env.get("SLURM_JOB_ID", "0"))
    return ClusterEnvironment(
        source="slurm",
        global_rank=int(env["SLURM_PROCID"]),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        node_rank=int(env.get("SLURM_NODEID", "0")),
        world_size=world_size,
        local_world_size=world_size // max(nodes, 1),
        main_address=env.get("MASTER_ADDR", first_slurm_host(nodelist)),
        # Same port on every node without talking: derived from the job id, as Lightning does.
        main_port=int(env.get("MASTER_PORT", 15000 + job_id % 20000)),
        processes_started=True,
    )


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as ``gpu[003-006,010],cpu01``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.fullmatch(r"([^\[]+)\[([^\]]+)\]", first)
    if match is None:
        return first
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def find_free_port() -> int:
    """A TCP port on this host that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
