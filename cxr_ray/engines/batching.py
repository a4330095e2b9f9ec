"""Opportunistic dynamic batching: a batch is formed when the model is free to run it.

Why not ``@serve.batch``: in Ray 2.60 its loop forms a batch as soon as requests
are queued and only then waits for the ``max_concurrent_batches`` semaphore. While
the model is busy, every arrival therefore becomes a batch of its own that waits
in line: with ``batch_wait_timeout_s=0`` (the latency-friendly setting) and 16
concurrent clients on a DenseNet-121 replica, the mean batch size was 1.04 and
requests queued for ~730 ms behind 46 ms single-image calls. A wait long enough
to fill batches adds that wait to every idle-server request.

Here the single consumer takes whatever queued (up to ``max_batch_size``) at the
moment the previous batch finished, which is what Serve's batching guide calls
opportunistic batching: an idle server answers at once, a busy one batches
everything that waited. ``batch_wait_timeout_s`` > 0 additionally waits that long
after the first request of a batch for it to fill (worth it on GPUs).

Pure asyncio, no Ray: serve's model stage (:mod:`cxr_ray.serve.predictor`) and
``cxr-ray listen`` (:mod:`cxr_ray.dicomnet.listen`) batch with this one class.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class OpportunisticBatcher(Generic[Item, Result]):
    """``await batcher.submit(item)`` -> that item's result from one ``run_batch(items)`` call.

    ``run_batch`` gets 1..max_batch_size items and must return one result per item,
    in order. It is never called concurrently with itself. If it raises, every
    caller in that batch gets the exception; the next batch runs normally.
    Callers that are cancelled while queued (client gone) are left out of batches.
    Must be used from one event loop (the one that first calls ``submit``).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queue: deque[tuple[Item, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._consumer: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        future: asyncio.Future = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if self._consumer is None or self._consumer.done():
            self._consumer = loop.create_task(self._consume(), name="cxr-batcher")
        return await future

    async def _consume(self) -> None:
        while True:
            await self._wait_for_first()
            if self.batch_wait_timeout_s > 0:
                await self._wait_to_fill()
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _wait_for_first(self) -> None:
        assert self._arrived is not None  # made by the first submit, before the consumer starts
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()

    async def _wait_to_fill(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_timeout_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[tuple[Item, asyncio.Future]]:
        batch: list[tuple[Item, asyncio.Future]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # cancelled while queued: its client is gone
                batch.append((item, future))
        return batch

    async def _run(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self._run_batch([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:  # the loop is shutting down: nobody waits forever
            self._fail(batch, RuntimeError("the batcher stopped before this batch finished"))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
            self._fail(batch, exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[Item, asyncio.Future]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
