"""Create the default process group for a run, and take it down cleanly at exit."""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from shardtrain.launch.environment import ClusterEnvironment


def backend_for(device: torch.device) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(environment: ClusterEnvironment, device: torch.device, timeout: timedelta) -> None:
    """Join the default process group of ``environment`` (no-op for one process or when already joined)."""
    if environment.world_size == 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", environment.main_address)
    os.environ.setdefault("MASTER_PORT", str(environment.main_port))
    kwargs: dict = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # eager NCCL init, and no guessing of the device per rank
    dist.init_process_group(
        backend_for(device),
        init_method="env://",
        rank=environment.global_rank,
        world_size=environment.world_size,
        timeout=timeout,
        **kwargs,
    )
    atexit.register(destroy_process_group)


def destroy_process_group() -> None:
    """Leave the process group so that no communication thread outlives the interpreter."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
