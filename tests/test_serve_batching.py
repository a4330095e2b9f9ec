"""The serving batcher on its own: plain asyncio, a model stand-in that can be held busy.

The property that matters (and that ``@serve.batch`` in Ray 2.60 lacks with a zero
wait): requests that arrive while the model is busy go into the *next* batch
together, instead of each becoming a batch of one that waits its turn.
"""

from __future__ import annotations

import asyncio

import pytest

from cxr_ray.engines.batching import OpportunisticBatcher


class HeldModel:
    """``run_batch`` that records each batch and blocks until the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        return [item * 10 for item in items]


async def _settle() -> None:
    for _ in range(5):  # let queued callbacks run
        await asyncio.sleep(0)


def test_requests_queued_behind_a_busy_model_share_the_next_batch():
    async def scenario():
        model = HeldModel()
        batcher = OpportunisticBatcher(model, max_batch_size=16, batch_wait_timeout_s=0.0)
        first = asyncio.ensure_future(batcher.submit(0))
        await model.started.wait()  # the model is busy with [0]
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 8)]
        await _settle()
        assert batcher.queued == 7 and model.batches == [[0]]
        model.release.set()
        results = await asyncio.gather(first, *rest)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3, 4, 5, 6, 7]]
    assert results == [i * 10 for i in range(8)]


def test_an_idle_batcher_answers_at_once_and_respects_max_batch_size():
    async def scenario():
        model = HeldModel()
        model.release.set()  # never blocks
        batcher = OpportunisticBatcher(model, max_batch_size=3)
        assert await batcher.submit(5) == 50  # alone, no waiting for company
        model.release.clear()
        model.started.clear()
        held = asyncio.ensure_future(batcher.submit(0))
        await model.started.wait()
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 8)]
        await _settle()
        model.release.set()
        await asyncio.gather(held, *queued)
        return model.batches

    assert asyncio.run(scenario()) == [[5], [0], [1, 2, 3], [4, 5, 6], [7]]


def test_a_failing_batch_fails_only_its_callers():
    async def scenario():
        calls = []

        async def flaky(items: list[int]) -> list[int]:
            calls.append(list(items))
            if len(calls) == 1:
                raise ValueError("backend broke")
            return items

        batcher = OpportunisticBatcher(flaky, max_batch_size=4)
        with pytest.raises(ValueError, match="backend broke"):
            await batcher.submit(1)
        return await batcher.submit(2), calls

    result, calls = asyncio.run(scenario())
    assert result == 2 and calls == [[1], [2]]


def test_a_wrong_number_of_results_is_an_error_for_every_caller():
    async def scenario():
        async def drops_one(items: list[int]) -> list[int]:
            return items[:-1]

        batcher = OpportunisticBatcher(drops_one, max_batch_size=4)
        return await asyncio.gather(batcher.submit(1), return_exceptions=True)

    (error,) = asyncio.run(scenario())
    assert isinstance(error, RuntimeError) and "0 results for 1 items" in str(error)


def test_a_caller_cancelled_while_queued_is_left_out():
    async def scenario():
        model = HeldModel()
        batcher = OpportunisticBatcher(model, max_batch_size=8)
        held = asyncio.ensure_future(batcher.submit(0))
        await model.started.wait()
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await _settle()
        gone.cancel()  # the client disconnected
        await _settle()
        model.release.set()
        return await held, await kept, model.batches

    held, kept, batches = asyncio.run(scenario())
    assert (held, kept) == (0, 20) and batches == [[0], [2]]


def test_a_positive_wait_lets_a_batch_fill_after_its_first_request():
    async def scenario():
        model = HeldModel()
        model.release.set()
        batcher = OpportunisticBatcher(model, max_batch_size=4, batch_wait_timeout_s=5.0)

        async def later(i: int) -> int:
            await asyncio.sleep(0.01 * i)
            return await batcher.submit(i)

        # Four arrivals spread over ~30 ms fill the batch long before the 5 s wait ends.
        results = await asyncio.wait_for(asyncio.gather(*(later(i) for i in range(4))), timeout=4.0)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[0, 1, 2, 3]] and results == [0, 10, 20, 30]


def test_callers_of_a_batch_cut_short_by_shutdown_get_an_error():
    async def scenario():
        model = HeldModel()  # never released
        batcher = OpportunisticBatcher(model, max_batch_size=4)
        waiting = asyncio.ensure_future(batcher.submit(1))
        await model.started.wait()
        batcher._consumer.cancel()  # what the event loop's shutdown does to the consumer task
        return await asyncio.gather(waiting, return_exceptions=True)

    (error,) = asyncio.run(scenario())
    assert isinstance(error, RuntimeError) and "stopped" in str(error)


@pytest.mark.parametrize("kwargs", [{"max_batch_size": 0}, {"max_batch_size": 4, "batch_wait_timeout_s": -1}])
def test_invalid_settings_are_refused(kwargs):
    async def noop(items):
        return items

    with pytest.raises(ValueError):
        OpportunisticBatcher(noop, **kwargs)
