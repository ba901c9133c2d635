"""Create the default process group for a run, and take it down cleanly at exit."""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from shardtrain.launch.environment import ClusterEnvironment, find_free_port


def backend_for(device: torch.device) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(environment: ClusterEnvironment, device: torch.device, timeout: timedelta, *, always: bool = False) -> None:
    """Join the default process group of ``environment``.

    A no-op when already joined, and for one process unless ``always`` (strategies built on
    DTensor need a group, even of one).
    """
    if dist.is_initialized() or (environment.world_size == 1 and not always):
        return
    os.environ.setdefault("MASTER_ADDR", environment.main_address)
    os.environ.setdefault("MASTER_PORT", str(environment.main_port or find_free_port()))
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
    _note_uncaught_exceptions()
    atexit.register(destroy_process_group)


_failed = False


def _note_uncaught_exceptions() -> None:
    """Remember whether the interpreter is exiting because of an exception (excepthook runs before atexit)."""
    previous = sys.excepthook

    def hook(*args: object) -> None:
        global _failed
        _failed = True
        previous(*args)  # type: ignore[arg-type]

    sys.excepthook = hook


def destroy_process_group() -> None:
    """Leave the process group so that no communication thread outlives the interpreter.

    After a clean run the ranks first meet at a barrier; a rank that is exiting with an
    exception skips it and leaves at once, so that its peers see the closed connections and
    fail instead of waiting for the collective timeout.
    """
    if not dist.is_initialized():
        return
    try:
        if not _failed:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        _let_communication_threads_finish()


def _let_communication_threads_finish() -> None:
    """Release the GIL briefly so gloo's worker threads can drop their last work objects.

    Measured on torch 2.13 CPU with Python 3.11: after the last collective, a gloo worker thread
    destroys the finished work object, which releases Python objects and so needs the GIL. If
    the interpreter is already finalising, Python ends that thread with ``pthread_exit`` in the
    middle of a ``noexcept`` destructor and the process aborts ("terminate called without an
    active exception", SIGABRT): 6 runs in 40 of a plain two-process job. Collecting garbage
    and sleeping 0.1 s here gave 0 aborts in 120 runs.
    """
    gc.collect()
    time.sleep(0.1)
