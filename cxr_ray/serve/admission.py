"""Admission to the model inside a fused replica: Serve's own limits, applied one stage in.

In the split topology the predictor deployment's ``max_ongoing_requests`` /
``max_queued_requests`` bound the requests at the model, and Serve raises
``BackPressureError`` beyond them, which the ingress turns into a JSON 503. In
the fused topology the model lives in the ingress replica, where Serve's limits
apply to whole HTTP requests and its proxy answers overload with a plain-text
503. :class:`ModelAdmission` enforces the same two numbers at the model call, so
overload is still answered by the API's JSON 503 at once, not after queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable


class ModelBusyError(Exception):
    """Every model slot is taken and the queue in front of them is full."""


class ModelAdmission:
    """``running`` requests at the model at once, ``queued`` more waiting (-1: no bound)."""

    def __init__(self, running: int, queued: int, on_waiting: Callable[[int], None] | None = None) -> None:
        """``on_waiting(n)``: told the number of waiting requests whenever it changes (a metrics gauge)."""
        if running < 1:
            raise ValueError(f"running must be >= 1, got {running}")
        self.running, self.queued_limit = running, queued
        self._slots: asyncio.Semaphore | None = None  # made in the replica's event loop
        self.waiting = 0
        self._on_waiting = on_waiting or (lambda n: None)

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.running)
        if self._slots.locked():
            if self.queued_limit != -1 and self.waiting >= self.queued_limit:
                raise ModelBusyError(f"{self.running} running and {self.waiting} queued at the model")
            self.waiting += 1
            self._on_waiting(self.waiting)
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
                self._on_waiting(self.waiting)
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()
