"""Where the processes of a run come from, read from the environment.

Three sources, checked in this order:

* **torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): we use its layout.
* **SLURM** (``srun``): ranks from ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NODEID``; the main
  address is the first host of ``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set.
* **local**: nothing set; shardtrain starts ``devices`` processes itself (see ``subprocess_launcher``).
  With ``num_nodes > 1`` this runs once per node, each with ``NODE_RANK`` (0 to ``num_nodes - 1``)
  and the same ``MASTER_ADDR`` (node 0's address) and ``MASTER_PORT`` (Lightning's convention;
  ``shardtrain fit --node-rank/--main-address/--main-port`` set them). Node ``n``'s processes are
  global ranks ``n * devices`` to ``n * devices + devices - 1``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from shardtrain.errors import ConfigError


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

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(self.local_world_size, 1))

    def describe(self) -> str:
        """One line for the logs, e.g. ``node 1 of 2 (torchrun): ranks 2-3 of 4, main node0:29500``."""
        first = self.global_rank - self.local_rank  # this node's first rank, as this process was told
        return (
            f"node {self.node_rank} of {self.num_nodes} ({self.source}): ranks {first}-{first + self.local_world_size - 1} "
            f"of {self.world_size}, main {self.main_address}:{self.main_port}"
        )


def detect_environment(
    devices: int | None, num_nodes: int, env: Mapping[str, str] | None = None, *, auto_devices: int = 1
) -> ClusterEnvironment:
    """Read the rank layout for a run of ``devices`` processes per node on ``num_nodes`` nodes.

    ``devices=None`` (``"auto"``) takes the launcher's processes per node, or ``auto_devices`` when
    shardtrain starts the processes itself. Under torchrun or SLURM an explicit ``devices`` or
    ``num_nodes`` that differs from the launcher's layout is a ``ConfigError`` (as in Lightning):
    the launcher's layout would silently win, and a run sized for 8 GPUs would run on 2.
    """
    env = os.environ if env is None else env
    if _is_torchrun(env):
        return _matching(_from_torchrun(env), devices, num_nodes, _TORCHRUN_FIX)
    if _is_slurm(env):
        return _matching(
            _from_slurm(env, int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))),
            devices,
            num_nodes,
            _SLURM_FIX,
        )
    return _local(auto_devices if devices is None else devices, num_nodes, env)


_TORCHRUN_FIX = {"devices": "--nproc-per-node", "num_nodes": "--nnodes"}
_SLURM_FIX = {"devices": "--ntasks-per-node", "num_nodes": "--nodes"}


def _matching(
    layout: ClusterEnvironment, devices: int | None, num_nodes: int, flags: dict[str, str]
) -> ClusterEnvironment:
    """``layout``, after checking that the run's own ``devices``/``num_nodes`` agree with it."""
    if layout.source == "local":
        return layout  # a rank shardtrain started from these very settings
    launcher = layout.source
    if devices is not None and devices != layout.local_world_size:
        raise ConfigError(
            f"devices={devices} but {launcher} started {layout.local_world_size} processes per node: set "
            f"devices={layout.local_world_size} (or devices='auto' to take {launcher}'s layout), or start "
            f"{launcher} with {flags['devices']} {devices}"
        )
    if num_nodes != layout.num_nodes:
        raise ConfigError(
            f"num_nodes={num_nodes} but {launcher} started {layout.num_nodes} nodes ({layout.world_size} processes, "
            f"{layout.local_world_size} per node): set num_nodes={layout.num_nodes} (--num-nodes), or start "
            f"{launcher} with {flags['num_nodes']} {num_nodes}"
        )
    return layout


def _local(devices: int, num_nodes: int, env: Mapping[str, str]) -> ClusterEnvironment:
    """The layout before shardtrain starts the processes of this node; checks what the nodes must agree on."""
    node_rank = _int_variable(env, "NODE_RANK", "--node-rank", default=0)
    port = _int_variable(env, "MASTER_PORT", "--main-port", default=0)
    if not 0 <= node_rank < num_nodes:
        raise ConfigError(
            f"NODE_RANK={node_rank} but the run has num_nodes={num_nodes}: number the nodes 0 to {num_nodes - 1} "
            f"(--node-rank, or the NODE_RANK variable), or raise num_nodes (--num-nodes)"
        )
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"MASTER_PORT={port} is not a TCP port; choose one from 1024 to 65535 (--main-port, or the MASTER_PORT variable)"
        )
    if num_nodes > 1 and port == 0:
        raise ConfigError(
            f"num_nodes={num_nodes} needs the main port, the same on every node: pass --main-port PORT (or set MASTER_PORT) "
            "to a free port of node 0. It cannot be chosen automatically because every node must agree on it"
        )
    if num_nodes > 1 and not env.get("MASTER_ADDR"):
        raise ConfigError(
            f"num_nodes={num_nodes} needs the main address, the same on every node: pass --main-address HOST (or set "
            "MASTER_ADDR) to the address of node 0 that the other nodes can reach"
        )
    return ClusterEnvironment(
        source="local",
        global_rank=node_rank * devices,
        local_rank=0,
        node_rank=node_rank,
        world_size=devices * num_nodes,
        local_world_size=devices,
        main_address=env.get("MASTER_ADDR") or "127.0.0.1",
        main_port=port,
        processes_started=devices * num_nodes == 1,
    )


def _int_variable(env: Mapping[str, str], name: str, flag: str, *, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number; set {name} (or {flag}) to one") from None


def outside_launcher(env: Mapping[str, str] | None = None) -> str | None:
    """``"torchrun"`` or ``"slurm"`` when one of them started this process, else None (also for ranks shardtrain started)."""
    env = os.environ if env is None else env
    if _is_torchrun(env):
        return None if env.get("SHARDTRAIN_LAUNCHER") == "local" else "torchrun"
    return "slurm" if _is_slurm(env) else None


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
    return (
        "SLURM_PROCID" in env
        and int(env.get("SLURM_NTASKS", "1")) > 1
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    )


def _from_slurm(env: Mapping[str, str], nodes: int) -> ClusterEnvironment:
    world_size = int(env["SLURM_NTASKS"])
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


def threads_per_process(local_world_size: int) -> int:
    """CPU threads for each of ``local_world_size`` processes on one machine: ``OMP_NUM_THREADS``
    when set, else the machine's cores shared out (the launcher gives its children the same)."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // local_world_size))
