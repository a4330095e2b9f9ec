"""The fused replica's admission to its model: the predictor's running / queued limits, at once."""

from __future__ import annotations

import asyncio

import pytest

from cxr_ray.serve.admission import ModelAdmission, ModelBusyError


def test_running_then_queued_then_refused_at_once():
    async def scenario():
        gate = ModelAdmission(running=1, queued=1)
        release = asyncio.Event()
        order: list[str] = []

        async def hold(name: str) -> None:
            async with gate.admit():
                order.append(f"{name} in")
                await release.wait()

        first = asyncio.create_task(hold("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(hold("second"))  # waits: the only slot is taken
        await asyncio.sleep(0)
        assert order == ["first in"] and gate.waiting == 1
        with pytest.raises(ModelBusyError):  # the queue of one is full: refused, not queued
            async with gate.admit():
                pass
        release.set()
        await asyncio.gather(first, second)
        assert order == ["first in", "second in"] and gate.waiting == 0
        async with gate.admit():  # slots come back
            order.append("third in")
        return order

    assert asyncio.run(scenario())[-1] == "third in"


def test_unbounded_queue_and_bad_limits():
    async def scenario():
        gate = ModelAdmission(running=2, queued=-1)
        release = asyncio.Event()
        entered = 0

        async def hold() -> None:
            nonlocal entered
            async with gate.admit():
                entered += 1
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert entered == 2 and gate.waiting == 8
        release.set()
        await asyncio.gather(*tasks)
        return entered

    assert asyncio.run(scenario()) == 10
    with pytest.raises(ValueError):
        ModelAdmission(running=0, queued=1)


def test_waiting_count_is_reported_as_it_changes():
    """What the ``cxr_ray_serve_queue_depth{queue="admission"}`` gauge is set from."""

    async def scenario() -> list[int]:
        seen: list[int] = []
        gate = ModelAdmission(running=1, queued=-1, on_waiting=seen.append)
        release = asyncio.Event()

        async def hold() -> None:
            async with gate.admit():
                await release.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert seen == [1, 2]  # one running, two waiting
        release.set()
        await asyncio.gather(*tasks)
        return seen

    assert asyncio.run(scenario()) == [1, 2, 1, 0]
