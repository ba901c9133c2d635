"""Lightning's ``lightning.pytorch.utilities`` helpers that user code imports: ``rank_zero_only``,
``rank_zero_info``, ``rank_zero_warn``, ``rank_zero_debug``."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _rank_from_environment() -> int:
    """The global rank a launcher (torchrun, SLURM) gave this process; 0 when none did."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def rank_zero_only(fn: Callable[..., T], default: T | None = None) -> Callable[..., T | None]:
    """Run ``fn`` on global rank 0 only; elsewhere return ``default`` (Lightning's ``rank_zero_only``).

    The rank is ``rank_zero_only.rank``: read from the launcher's environment at import, and set by the
    Trainer/Engine when its processes start (``devices=N`` starts them itself).
    """

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T | None:
        if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
            return fn(*args, **kwargs)
        return default

    return wrapped


rank_zero_only.rank = _rank_from_environment()  # type: ignore[attr-defined]


_log = logging.getLogger("shardtrain")


def rank_zero_info(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """``logging.info`` on global rank 0 only (Lightning's ``rank_zero_info``)."""
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        _log.info(*args, stacklevel=stacklevel, **kwargs)


def rank_zero_debug(*args: Any, stacklevel: int = 4, **kwargs: Any) -> None:
    """``logging.debug`` on global rank 0 only (Lightning's ``rank_zero_debug``)."""
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        _log.debug(*args, stacklevel=stacklevel, **kwargs)


def rank_zero_warn(message: str | Warning, stacklevel: int = 4, **kwargs: Any) -> None:
    """``warnings.warn`` on global rank 0 only (Lightning's ``rank_zero_warn``; ``category=`` is passed on)."""
    if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
        warnings.warn(message, stacklevel=stacklevel, **kwargs)
