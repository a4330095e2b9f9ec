"""Keeping a long-running verb (``serve``, ``listen``) in the foreground until it is told to stop."""

from __future__ import annotations

import signal
import time


def wait_until_stopped() -> None:
    """Return on Ctrl-C or SIGTERM (a process manager's stop); the caller then shuts down cleanly.

    SIGINT is re-armed because a shell may start background jobs with it ignored.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
