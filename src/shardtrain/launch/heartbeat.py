"""Each rank's progress in the run's store, and one report naming the stuck rank when the ranks stop.

A hung job says nothing by itself: every rank waits in a collective for a rank that is somewhere else (a
sleep, a data read, a save, a collective the others skipped) until the collective timeout ends it with
"Timed out waiting ... for recv", naming neither the rank nor the place. Here:

* **Progress.** The loop says where each rank is with ``progress(step, phase)`` (the Trainer does: ``data``,
  ``training_step``, ``optimizer_step``, ``validation batch N``, ``checkpoint``): two Python assignments, no
  sync. Every rank runs one daemon thread that copies them into the process group's own store (the rendezvous
  ``TCPStore``, no new connection) every ``interval`` seconds.
* **No progress for ``hang_timeout`` seconds** (seen by rank 0's thread: no rank moved on to another phase or step), or
  **a collective that failed with a timeout** on any rank: one rank asks every rank for its main thread's
  Python stack through the store. Each rank's thread answers (a thread runs while the main thread waits in a
  collective, a sleep or a read). The report names the ranks that are behind or away from the others (a lower
  step, another phase, or a stack outside PyTorch while the others wait inside it), with every rank's step,
  phase and stack. It goes to standard error and, when the run has a directory, to ``hang_report.txt`` there.
* After a report on no progress, every rank leaves with exit code 124, so that the job ends (torchrun can
  restart it) rather than waiting for the collective timeout.

Detection waits for the first ``progress`` call: a loop of your own that never reports is not judged.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

EXIT_CODE = 124
_PREFIX = "shardtrain/heartbeat"
_REQUEST = f"{_PREFIX}/stacks_requested"
_END = f"{_PREFIX}/end"
_REPORTER = f"{_PREFIX}/reporter"


def default_hang_timeout(timeout_seconds: float) -> float:
    """Before the collective timeout ends the run: ``max(0.8 x timeout, timeout - 60 s)``."""
    return max(0.8 * timeout_seconds, timeout_seconds - 60.0)


@dataclass
class RankState:
    rank: int
    step: int | None
    phase: str
    stack: str = ""
    innermost: str = ""  # the main thread's innermost frame, "file:line in function"
    in_pytorch: bool = False  # that frame is PyTorch's own code (waiting in a collective or a kernel)
    function: str = ""  # that frame's function (PyTorch's, when in_pytorch: barrier, _engine_run_backward, ...)
    caller: str = ""  # the innermost frame outside PyTorch, "file:line in function: code"


class Heartbeat:
    """This rank's progress, copied to the store by a daemon thread; on rank 0 also the watch for a hang."""

    def __init__(self, store: Any, rank: int, world_size: int, hang_timeout: float | None, interval: float) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.hang_timeout = hang_timeout
        self.interval = interval
        self.report_dir: Path | None = None
        self.step: int | None = None
        self.phase = "starting"
        self._phase_started = time.perf_counter()
        #: Seconds this rank spent in the ``data`` phase (waiting for its next batch), and how many such waits.
        self.data_seconds = 0.0
        self.data_waits = 0
        self._moves = 0  # progress calls: a rank that moves between the same places still moves
        self._main = threading.main_thread()
        self._stop = threading.Event()
        self._answered = False
        self._seen: tuple[Any, ...] | None = None
        self._seen_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="shardtrain-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.interval + 1)

    def progress(self, step: int | None, phase: str) -> None:
        now = time.perf_counter()
        if self.phase == "data" and phase != "data":  # a batch arrived: the wait for it, for stragglers
            self.data_seconds += now - self._phase_started
            self.data_waits += 1
        self.step, self.phase, self._phase_started = step, phase, now
        self._moves += 1

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                if self.rank == 0 and self.hang_timeout is not None and self._no_progress_for() > self.hang_timeout:
                    self.report(f"no rank made progress for {self._no_progress_for():.0f} s (hang_timeout)")
                    self.store.set(_END, "1")  # the others leave when they read it (or when their launcher sees
                    sys.stderr.flush()  # this rank end: our launcher, srun --kill-on-bad-exit); this rank first, so
                    os._exit(EXIT_CODE)  # that its waiting collective does not fail noisily after the report
            except Exception:  # the store is gone (its host ended): nothing more to do here
                return
            if self._ending():
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_CODE)

    def _beat(self) -> None:
        beat = {"step": self.step, "phase": self.phase, "moves": self._moves}
        beat |= {"data_s": self.data_seconds, "data_n": self.data_waits}
        self.store.set(f"{_PREFIX}/rank{self.rank}", json.dumps(beat))
        if not self._answered and self.store.check([_REQUEST]):
            self.store.set(f"{_PREFIX}/stack{self.rank}", json.dumps(self._own_stack()))
            self._answered = True

    def _ending(self) -> bool:
        try:
            return self.store.check([_END])
        except Exception:
            return False

    def _no_progress_for(self) -> float:
        """Seconds since rank 0 last saw any rank move (a ``progress`` call); 0 before the first one and while every
        rank is out of the loop (``step=None``)."""
        keys = [f"{_PREFIX}/rank{rank}" for rank in range(self.world_size)]
        if not self.store.check(keys):
            return 0.0
        beats = [json.loads(value) for value in self.store.multi_get(keys)]
        where = tuple(beat["moves"] for beat in beats)
        if where != self._seen or all(beat["step"] is None for beat in beats):
            self._seen, self._seen_at = where, time.monotonic()
        return time.monotonic() - self._seen_at

    def _own_stack(self) -> dict[str, Any]:
        frame = sys._current_frames().get(self._main.ident or -1)
        return describe_frames(traceback.extract_stack(frame) if frame is not None else [])

    # ---------------------------------------------------------------- the report
    def report(self, why: str, own: BaseException | None = None) -> str | None:
        """Ask every rank for its stack, wait for the answers, and print and write one report (once per run: the
        first rank to ask writes it). Returns the report, or None when another rank is writing it. ``own``: the
        exception this rank's main thread is leaving with, whose traceback stands for its stack."""
        if self.store.add(_REPORTER, 1) != 1:
            return None
        if own is not None:
            answer = describe_frames(traceback.extract_tb(own.__traceback__))
            self.store.set(f"{_PREFIX}/stack{self.rank}", json.dumps(answer))
            self._answered = True
        self.store.set(_REQUEST, "1")
        self._beat()  # this rank's own answer (from its heartbeat thread: its main thread's stack)
        keys = [f"{_PREFIX}/stack{rank}" for rank in range(self.world_size)]
        deadline = time.monotonic() + 2 * self.interval + 2
        while time.monotonic() < deadline and not self.store.check(keys):
            time.sleep(0.2)
        states = [self._state(rank) for rank in range(self.world_size)]
        text = format_report(why, states)
        print(text, file=sys.stderr, flush=True)
        if self.report_dir is not None:
            try:
                self.report_dir.mkdir(parents=True, exist_ok=True)
                (self.report_dir / "hang_report.txt").write_text(text + "\n")
            except OSError:
                pass
        return text

    def _state(self, rank: int) -> RankState:
        beat = _get(self.store, f"{_PREFIX}/rank{rank}")
        stack = _get(self.store, f"{_PREFIX}/stack{rank}")
        progress = json.loads(beat) if beat else {"step": None, "phase": "no heartbeat"}
        answer = json.loads(stack) if stack else {"stack": "(no answer: the rank's process is gone or frozen)\n"}
        return RankState(
            rank=rank,
            step=progress["step"],
            phase=progress["phase"],
            stack=answer["stack"],
            innermost=answer.get("innermost", ""),
            in_pytorch=answer.get("in_pytorch", False),
            function=answer.get("function", ""),
            caller=answer.get("caller", ""),
        )


def _in_pytorch(frame: traceback.FrameSummary) -> bool:
    return f"{os.sep}torch{os.sep}" in frame.filename


def describe_frames(frames: list[traceback.FrameSummary]) -> dict[str, Any]:
    """A rank's answer: its last 12 frames, its innermost frame, and the innermost one outside PyTorch."""
    innermost = frames[-1] if frames else None
    caller = next((f for f in reversed(frames) if not _in_pytorch(f)), None)
    return {
        "stack": "".join(traceback.format_list(frames[-12:])),
        "innermost": f"{innermost.filename}:{innermost.lineno} in {innermost.name}" if innermost else "",
        "in_pytorch": bool(innermost and _in_pytorch(innermost)),
        "function": innermost.name if innermost else "",
        "caller": f"{caller.filename}:{caller.lineno} in {caller.name}: {(caller.line or '').strip()}"
        if caller
        else "",
    }


def _get(store: Any, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def stuck_ranks(states: list[RankState]) -> tuple[list[int], str]:
    """The ranks the others wait for, and why: behind the others' step; outside PyTorch (not in a collective)
    while the others wait inside it; or in another phase than all the others. With every rank inside PyTorch
    but in different functions, no rank is named: the ranks wait in different collectives."""
    steps = [s.step for s in states if s.step is not None]
    if steps and min(steps) != max(steps):
        low = min(steps)
        return [s.rank for s in states if s.step == low], f"at step {low}, behind the others (step {max(steps)})"
    outside = [s.rank for s in states if s.innermost and not s.in_pytorch]
    if outside and len(outside) < len(states):
        return outside, "not in a collective (in code of its own) while the others wait inside PyTorch"
    waiting = {s.function for s in states if s.in_pytorch}
    if len(waiting) > 1:
        return [], (
            "the ranks wait in different PyTorch calls: a collective that some ranks called and the others did "
            "not, or called in another order (see where each rank called it)"
        )
    phases = [s.phase for s in states]
    odd = [s.rank for s in states if phases.count(s.phase) == 1]
    if len(states) > 2 and len(odd) == 1:
        return odd, f"in {states[odd[0]].phase!r}, where no other rank is"
    return [], "every rank is at the same place"


def format_report(why: str, states: list[RankState]) -> str:
    ranks, reason = stuck_ranks(states)
    lines = [f"[shardtrain] hang: {why}."]
    if ranks:
        lines.append(f"[shardtrain] the others wait for rank{'s' if len(ranks) > 1 else ''} "
                     f"{', '.join(map(str, ranks))}: {reason}.")  # fmt: skip
    else:
        lines.append(f"[shardtrain] no rank stands out ({reason}); each rank's stack follows.")
    for state in sorted(states, key=lambda s: (s.rank not in ranks, s.rank)):
        mark = "  <- stuck" if state.rank in ranks else ""
        where = f", in {state.function}" if state.function else ""
        called = f", called from {state.caller}" if state.caller else ""
        lines.append(f"rank {state.rank}: step {state.step}, {state.phase}{where}{called}{mark}")
        lines.extend("    " + line for line in state.stack.rstrip().splitlines())
    return "\n".join(lines)


# ------------------------------------------------------------------------ this process's heartbeat

_current: Heartbeat | None = None


def start(hang_timeout: float | None, timeout_seconds: float) -> None:
    """Start this rank's heartbeat on the default group's store (every rank of a run of 2 or more)."""
    global _current
    if _current is not None or not dist.is_initialized() or dist.get_world_size() < 2:
        return
    from torch.distributed.distributed_c10d import _get_default_store

    watch = hang_timeout if hang_timeout is not None else default_hang_timeout(timeout_seconds)
    interval = min(5.0, max(0.5, watch / 8))
    _current = Heartbeat(_get_default_store(), dist.get_rank(), dist.get_world_size(), watch, interval)
    _current.start()


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def progress(step: int | None, phase: str) -> None:
    """Say where this rank is (no sync; nothing without a heartbeat); ``step=None``: out of the loop, not judged
    (once every rank is)."""
    if _current is not None:
        _current.progress(step, phase)


def data_waits() -> dict[int, tuple[int, float]] | None:
    """Each rank's count of waits for a batch and their seconds in all, as its heartbeat last wrote them (up to
    one interval old; a store read, no collective); None without a heartbeat."""
    if _current is None:
        return None
    keys = [f"{_PREFIX}/rank{rank}" for rank in range(_current.world_size)]
    if not _current.store.check(keys):
        return None
    beats = [json.loads(value) for value in _current.store.multi_get(keys)]
    return {rank: (beat.get("data_n", 0), beat.get("data_s", 0.0)) for rank, beat in enumerate(beats)}


def set_report_dir(directory: Path | None) -> None:
    if _current is not None:
        _current.report_dir = directory


def report_if_timed_out(exception: BaseException) -> None:
    """After a collective failed with a timeout on this rank (``exception`` or what caused it): the report,
    before the rank leaves."""
    if _current is None:
        return
    timeout = next((e for e in _chain(exception) if "timed out" in str(e).lower()), None)
    if timeout is None:
        return
    first_line = (str(timeout).strip().splitlines() or [""])[0][:200]
    try:
        _current.report(f"rank {_current.rank}'s collective timed out ({first_line})", own=exception)
    except Exception:  # the store is gone: the rank's own error is all there is
        pass


def _chain(exception: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = exception
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found
