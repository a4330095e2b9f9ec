"""A per-input decode deadline: a decoder that hangs or spins becomes a ``timeout`` error.

Two layers, because no single mechanism covers every way a decoder can stall:

* :func:`call_with_deadline` (every surface): the decoder runs on a daemon
  thread (kept for the next input) while the caller waits at most ``seconds``. A decoder that
  sleeps, waits on I/O, loops in Python or runs native code that releases the
  GIL (Pillow, NumPy, OpenJPEG through pylibjpeg) is abandoned at the deadline
  and the input gets a ``timeout`` error; the caller goes on with the next
  input. The hand-off itself costs about 50 microseconds of wall time (a futex
  wake each way, usually to the other core); the decoder's working set then
  lives on that core, which costs about as much again on a multi-MB image
  (``cxr-ray bench decode`` reports both as ``deadline``).
  Python offers no way to stop a thread, so an abandoned decoder keeps its
  thread until it returns by itself.
* :func:`process_backstop` (screening workers only): native code that spins
  while *holding* the GIL freezes the waiting caller too. ``faulthandler``'s
  timer is a C thread that needs no GIL: past the backstop it dumps the
  stacks to the worker's log and exits the process. Ray then retries the
  batch, the isolating pass screens its inputs one at a time, and the one that
  still kills its worker gets a ``worker_crashed`` row. It is only used where
  the process belongs to Ray and is retried, never in the HTTP replica or a
  user's own process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from cxr_ray.errors import DecodeError

T = TypeVar("T")

# How much longer than the soft deadline the process backstop waits: the soft one must get the
# first chance, and a loaded machine may be slow to schedule the waiting thread.
BACKSTOP_GRACE_S = 10.0


class _Outcome:
    """What the decoder thread produced, handed back under the caller's wait."""

    __slots__ = ("error", "finished", "value")

    def __init__(self) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.finished = threading.Event()


class _DecodeThread:
    """A daemon thread that runs one function at a time, kept for the next input.

    Reused rather than started per input: starting a thread costs about twice
    the hand-off, and a fresh thread also starts with a cold malloc arena.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # daemon: an abandoned decoder must not keep the interpreter from exiting.
        threading.Thread(target=self._serve, name="cxr-ray-decode", daemon=True).start()

    def _serve(self) -> None:
        while True:
            function, outcome = self._jobs.get()
            try:
                outcome.value = function()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
                outcome.error = exc
            finally:
                outcome.finished.set()
            del function, outcome  # hold no image while idle

    def submit(self, function: Callable[[], object]) -> _Outcome:
        outcome = _Outcome()
        self._jobs.put((function, outcome))
        return outcome


# Idle decode threads: one per concurrent caller (the HTTP replica decodes on several threads).
# A thread whose decoder ran past the deadline is never put back.
_idle: list[_DecodeThread] = []
_idle_lock = threading.Lock()
os.register_at_fork(after_in_child=_idle.clear)  # threads do not survive a fork


def _take() -> _DecodeThread:
    with _idle_lock:
        return _idle.pop() if _idle else _DecodeThread()


def call_with_deadline(function: Callable[[], T], seconds: float | None, name: str) -> T:
    """``function()``, or ``DecodeError("timeout")`` if it has not returned after ``seconds``.

    ``seconds`` None (or <= 0) calls it directly, on this thread. Exceptions
    raised by ``function`` are re-raised here unchanged.
    """
    if seconds is None or seconds <= 0:
        return function()
    worker = _take()
    outcome = worker.submit(function)
    if not outcome.finished.wait(seconds):  # the worker stays busy with it: abandoned, not returned
        raise DecodeError(
            "timeout", f"{name}: decoding did not finish within {seconds:g} s (DecodePolicy.max_decode_seconds)"
        )
    with _idle_lock:
        _idle.append(worker)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[return-value]


def _stderr_fd() -> int | None:
    """A file descriptor for faulthandler's dump: stderr's, or the process's original one.

    ``sys.stderr`` may be a stream without a descriptor (pytest's capture, a notebook); faulthandler
    writes from C and needs a real one. None when there is none at all: the backstop is then off.
    """
    for stream in (sys.stderr, sys.__stderr__):
        try:
            return stream.fileno()  # type: ignore[union-attr]
        except (AttributeError, ValueError, io.UnsupportedOperation):
            continue
    return None


@contextlib.contextmanager
def process_backstop(seconds: float | None) -> Iterator[None]:
    """Exit this process (stacks dumped to stderr) if the block runs past ``seconds`` + grace.

    For Ray worker processes only: see the module docstring. ``seconds`` None
    (or <= 0) arms nothing.
    """
    fd = None if seconds is None or seconds <= 0 else _stderr_fd()
    if fd is None:
        yield
        return
    assert seconds is not None
    faulthandler.dump_traceback_later(seconds + BACKSTOP_GRACE_S, exit=True, file=fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
