"""This process's place in a run: the accelerator, the rank layout, and starting the other processes.

``RunProcesses`` checks ``accelerator``, ``devices`` and ``num_nodes`` before anything starts,
reads the layout from torchrun, SLURM or the arguments (``environment``), and on ``start()``
starts the local processes when no launcher did (``subprocess_launcher``).
"""

from __future__ import annotations

from typing import Literal

import torch

from shardtrain.errors import ConfigError
from shardtrain.launch.environment import ClusterEnvironment, detect_environment, threads_per_process
from shardtrain.launch.subprocess_launcher import launch_local_processes


def resolve_accelerator(accelerator: str) -> str:
    """``"cpu"`` or ``"cuda"`` for ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"gpu"``, checked against this machine."""
    if accelerator not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"unknown accelerator {accelerator!r}; choose 'auto', 'cpu' or 'cuda'")
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError("accelerator='cuda' but no CUDA device is available; use accelerator='cpu' or 'auto'")
    return "cuda" if accelerator == "gpu" else accelerator


class RunProcesses:
    """The processes of a run as this process sees them; see the module docstring."""

    def __init__(self, accelerator: str, devices: int | Literal["auto"], num_nodes: int) -> None:
        if devices != "auto" and (not isinstance(devices, int) or isinstance(devices, bool) or devices < 1):
            raise ConfigError(f"devices must be a whole number >= 1 or 'auto', got {devices!r}")
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ConfigError(f"num_nodes must be a whole number >= 1, got {num_nodes!r}")
        self.accelerator = resolve_accelerator(accelerator)
        visible = torch.cuda.device_count() if self.accelerator == "cuda" else 1
        self.environment = detect_environment(None if devices == "auto" else devices, num_nodes, auto_devices=visible)
        if self.accelerator == "cuda" and self.environment.local_world_size > visible:
            raise ConfigError(
                f"devices={self.environment.local_world_size} but this machine has {visible} CUDA devices"
            )

    def start(self) -> ClusterEnvironment:
        """Start the other local processes unless a launcher did; returns this process's layout."""
        if not self.environment.processes_started:
            launch_local_processes(self.environment)
            self.environment = detect_environment(self.environment.local_world_size, 1)
        if self.accelerator == "cpu" and self.environment.local_world_size > 1:
            torch.set_num_threads(threads_per_process(self.environment.local_world_size))
        return self.environment

    @property
    def device(self) -> torch.device:
        """This process's device: its local rank's GPU, or the CPU."""
        if self.accelerator == "cuda":
            return torch.device("cuda", self.environment.local_rank)
        return torch.device("cpu")
