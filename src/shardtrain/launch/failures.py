"""Which rank failed first, and why: so that every rank's error names the real cause.

When one rank raises, its peers fail a moment later in whatever collective they were in, with
messages such as "Connection closed by peer" that name neither the rank nor the cause. Before
it exits, a failing rank writes its traceback into the process group's own key-value store (the
``TCPStore`` of the rendezvous, no new connection) with a sequence number from ``store.add``,
so the first failure recorded is the root cause. The other ranks read it and raise
:class:`~shardtrain.errors.RankFailedError` with that rank and traceback. Under torchrun the
traceback also goes to torchelastic's error file, which torchrun prints as the root cause.

The store lives in rank 0's process with our launcher (in torchrun's agent under torchrun), so
when rank 0 itself fails, only its own output holds the traceback.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch.distributed as dist

from shardtrain.errors import RankFailedError

_COUNT_KEY = "shardtrain/failures"
_MARK = "_shardtrain_failure_published"


@dataclass(frozen=True)
class RankFailure:
    rank: int
    traceback: str


def _store():  # the default group's store: a PrefixStore over the rendezvous TCPStore
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def publish_failure(exception: BaseException) -> None:
    """Record that this rank fails with ``exception`` (once per exception; never raises)."""
    if getattr(exception, _MARK, False) or isinstance(exception, SystemExit):
        return
    try:
        setattr(exception, _MARK, True)
    except AttributeError:
        pass
    text = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
    _write_torchelastic_error_file(exception)
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        store = _store()
        order = store.add(_COUNT_KEY, 1)
        store.set(f"{_COUNT_KEY}/{order}", f"{dist.get_rank()}\n{text}")
    except Exception:  # the store is gone (its host rank died): nothing more to tell
        pass


def first_failure() -> RankFailure | None:
    """The first failure any rank recorded, or None (also when the store cannot be reached)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        store = _store()
        key = f"{_COUNT_KEY}/1"
        if not store.check([key]):
            return None
        rank, _, text = store.get(key).decode(errors="replace").partition("\n")
        return RankFailure(int(rank), text)
    except Exception:
        return None


def _write_torchelastic_error_file(exception: BaseException) -> None:
    """Under torchrun, what ``@record`` would write: torchrun prints it as the root cause."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exception)
    except Exception:
        pass


def explain_failure(exception: BaseException, rank: int) -> RankFailedError | None:
    """Record that ``rank`` fails with ``exception``; if another rank failed first, the error that
    names it and holds its traceback (raise it ``from exception``)."""
    if isinstance(exception, SystemExit):
        return None
    publish_failure(exception)
    root = first_failure()
    if root is None or root.rank == rank:
        return None
    return RankFailedError(root.rank, root.traceback)
