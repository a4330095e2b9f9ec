"""cxr-ray's one progress line on stderr: done/total, rate, ETA, counts; the same for every verb.

Two shapes, chosen by whether stderr is a terminal (the convention of tqdm, pip, curl):

* on a TTY, one line that rewrites itself in place (``\\r`` and erase-to-end-of-line), refreshed at
  most every :data:`TTY_REFRESH_S`, ended with a newline when the work ends;
* otherwise (a log file, CI, ``ray job logs``) plain lines, one every ``every_s`` seconds and a
  final one, so that a log holds a readable history instead of carriage returns.

Stdout is never written: it carries the verbs' JSON.

:class:`ProgressLine` counts work items (images, batches). :func:`stages` / :func:`stage` name the
steps of a verb that has no item count (export: trace, verify; bench: one section after another):
the verb opens ``with stages("export"):`` and library code announces its steps with
``stage("verifying ...")``, a no-op when no verb listens (a Ray worker, a test, a notebook), so
engines and benches stay quiet unless run from the CLI.

A line reads, for example::

    screen: 120/500 images (24%) 41.2 images/s ETA 9s | ok 118 error 2 skipped 0 flagged 17
    screen: 120 images, total not known yet (still listing) 41.2 images/s | ok 118 ...
    screen: 500/500 images (100%) 40.7 images/s done in 12s | ok 480 error 20 ...

The rate is over the last :data:`RATE_WINDOW_S` seconds, counted from the first items done: a run's
start-up (actors loading a model, the listing's first page) is not averaged into its ETA, which is
``?`` until a second update gives a rate. The final line gives the whole run's average.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TextIO

TTY_REFRESH_S = 0.2
RATE_WINDOW_S = 30.0
ERASE_TO_END = "\x1b[K"


def format_duration(seconds: float) -> str:
    """``7s``, ``3m05s``, ``2h04m``: short enough for one line, exact enough for an ETA."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(per_s: float, unit: str) -> str:
    """``41.2 images/s``; two decimals below one per second (``0.08 batches/s``), where one says nothing."""
    if per_s <= 0 or not math.isfinite(per_s):
        return f"? {unit}/s"
    return f"{per_s:.{2 if per_s < 1 else 1}f} {unit}/s"


def eta_seconds(done: int, total: int | None, per_s: float) -> float | None:
    """Seconds left at ``per_s``; None when the total or the rate is not known."""
    if total is None or per_s <= 0:
        return None
    return max(0, total - done) / per_s


def epoch_eta(epoch: int, epochs: int, epoch_seconds: float) -> str:
    """``ETA 4m10s`` for the epochs left at this epoch's pace (``done`` after the last one).

    Early stopping can end a run sooner: the ETA is the longest it will take.
    """
    left = max(0, epochs - epoch)
    return f"ETA {format_duration(left * epoch_seconds)}" if left else "done"


def is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class _Writer:
    """One line on ``stream``: rewritten in place on a TTY, appended otherwise."""

    def __init__(self, stream: TextIO | None, tty: bool | None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_tty(self.stream) if tty is None else tty
        self.open_line = False  # a TTY line written without its newline yet

    def show(self, text: str, *, final: bool = False) -> None:
        if self.tty:
            end = "\n" if final else ""
            self.stream.write(f"\r{text}{ERASE_TO_END}{end}")
            self.open_line = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


class ProgressLine:
    """done/total, recent rate, ETA and counts of one long task, on one line (see the module doc).

    ``every_s`` is the interval between plain lines when stderr is not a TTY; 0 turns the line
    off altogether (tests, benches that time the job). Not thread-safe: one caller updates it.
    """

    def __init__(self, label: str, *, total: int | None = None, unit: str = "images", every_s: float = 15.0,
                 stream: TextIO | None = None, tty: bool | None = None, unknown_total: str = "total not known yet",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.unknown_total, self.clock = unknown_total, clock
        self.writer = _Writer(stream, tty)
        self.started = self.clock()
        self.last_shown: float | None = None
        self.done = 0
        self.counts: dict[str, int] = {}
        self.recent: deque[tuple[float, int]] = deque([(self.started, 0)])
        self.finished = False

    @property
    def enabled(self) -> bool:
        return self.every_s > 0

    def begin(self, text: str) -> None:
        """A first line before any item is done (``LABEL: text``), so a slow start is not silent."""
        if self.enabled:  # a line of its own: start-up is when Ray's workers still speak on stderr
            self.writer.show(f"{self.label}: {text}", final=True)

    def update(self, done: int, *, total: int | None = None, counts: Mapping[str, int] | None = None) -> None:
        """Record progress; shows a line when the refresh interval has passed.

        Not once every item is done: the final count is the final line's (:meth:`finish`), said once.
        """
        now = self._record(done, total, counts)
        if not self.enabled or self.complete:
            return
        interval = TTY_REFRESH_S if self.writer.tty else self.every_s
        if self.last_shown is None or now - self.last_shown >= interval:
            self.last_shown = now
            self.emit(now)

    def _record(self, done: int, total: int | None, counts: Mapping[str, int] | None) -> float:
        now = self.clock()
        self.done = int(done)
        if total is not None:
            self.total = int(total)
        if counts is not None:
            self.counts = {k: int(v) for k, v in counts.items()}
        if self.done and not self.recent[-1][1]:
            self.recent.clear()  # the first items are done: start-up (loading, listing) is no part of the rate
        self.recent.append((now, self.done))
        while len(self.recent) > 2 and now - self.recent[1][0] >= RATE_WINDOW_S:
            self.recent.popleft()  # keep one point at or beyond the window's start
        return now

    @property
    def complete(self) -> bool:
        """Every item of a known total is done."""
        return self.total is not None and self.done >= self.total

    def rate(self, now: float | None = None) -> float:
        """Items per second over the recent window (the whole run when it is younger than the window)."""
        now = self.clock() if now is None else now
        then, done_then = self.recent[0]
        return (self.done - done_then) / (now - then) if now > then else 0.0

    def text(self, now: float | None = None, *, final: bool = False) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.started
        if self.total is not None:
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            head = f"{self.label}: {self.done}/{self.total} {self.unit}{share}"
        else:
            head = f"{self.label}: {self.done} {self.unit}, {self.unknown_total}"
        if final:
            rate = self.done / elapsed if elapsed > 0 else 0.0
            tail = f"done in {format_duration(elapsed)}"
        else:
            rate = self.rate(now)
            eta = eta_seconds(self.done, self.total, rate)
            tail = f"ETA {format_duration(eta)}" if eta is not None else ("ETA ?" if self.total is not None else "")
        parts = [head, format_rate(rate, self.unit), tail]
        line = " ".join(p for p in parts if p)
        if self.counts:
            line += " | " + " ".join(f"{k} {v}" for k, v in self.counts.items())
        return line

    def finish(self, done: int | None = None, *, total: int | None = None,
               counts: Mapping[str, int] | None = None) -> None:
        """The final line (whole-run rate, elapsed time), once; nothing when the line is off."""
        now = self._record(self.done if done is None else done, total, counts)
        if self.finished or not self.enabled:
            return
        self.finished = True
        self.emit(now, final=True)

    def emit(self, now: float, *, final: bool = False) -> None:
        """Write the line (a subclass may write the same figures in another shape)."""
        self.writer.show(self.text(now, final=final), final=final)


class Stages:
    """The named steps of one verb, each shown as it starts, then how long the whole took."""

    def __init__(self, label: str, *, stream: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.clock = label, clock
        self.writer = _Writer(stream, tty)
        self.started = self.clock()

    def stage(self, message: str) -> None:
        elapsed = format_duration(self.clock() - self.started)
        self.writer.show(f"{self.label}: {message}... ({elapsed} so far)")

    def done(self, ok: bool) -> None:
        """``LABEL: done in ...``; after a failure only the line is ended (the error is the one line)."""
        if ok:
            self.writer.show(f"{self.label}: done in {format_duration(self.clock() - self.started)}", final=True)
        else:
            self.writer.end_line()


_current: contextvars.ContextVar[Stages | None] = contextvars.ContextVar("cxr_ray_stages", default=None)


@contextlib.contextmanager
def stages(label: str, *, stream: TextIO | None = None, tty: bool | None = None) -> Iterator[Stages]:
    """Listen for :func:`stage` calls made while the block runs; ends with ``LABEL: done in ...``."""
    listener = Stages(label, stream=stream, tty=tty)
    token = _current.set(listener)
    ok = False
    try:
        yield listener
        ok = True
    finally:
        _current.reset(token)
        listener.done(ok)


def stage(message: str) -> None:
    """Announce the next step of the running verb; a no-op when no verb opened :func:`stages`."""
    listener = _current.get()
    if listener is not None:
        listener.stage(message)
