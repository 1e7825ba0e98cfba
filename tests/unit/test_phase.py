"""`Phase` keeps `asyncio.timeout`'s contract: its own cancellation becomes TimeoutError, nobody
else's does."""

from __future__ import annotations

import asyncio

import pytest

from gateway.proxy.phase import Phase

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def current() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task


async def test_the_deadline_ends_the_block_with_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        with Phase(current(), 0.05):
            await asyncio.sleep(10)
    assert 0.04 <= loop.time() - started < 5
    await asyncio.sleep(0)  # the task is usable afterwards: no cancellation left pending
    assert current().cancelling() == 0


async def test_no_deadline_and_an_early_end_leave_the_block_alone() -> None:
    with Phase(current(), None):
        await asyncio.sleep(0.01)
    with Phase(current(), 10):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)  # a deadline handle left armed would cancel this
    assert current().cancelling() == 0


async def test_stop_now_ends_the_block_on_the_next_turn_once() -> None:
    with pytest.raises(TimeoutError):
        with Phase(current(), None) as phase:
            assert phase.stop_now() is True
            assert phase.stop_now() is True  # not yet expiring: rescheduled, still one cancel
            await asyncio.sleep(10)
    with pytest.raises(TimeoutError):
        with Phase(current(), None) as phase:
            asyncio.get_running_loop().call_later(0.01, lambda: phase.stop_now())
            await asyncio.sleep(10)
    assert current().cancelling() == 0


async def test_stop_now_after_the_end_began_says_so() -> None:
    with pytest.raises(TimeoutError):
        with Phase(current(), 0.01) as phase:
            try:
                await asyncio.sleep(10)
            finally:
                assert phase.stop_now() is False  # already expiring: nothing more to cancel


async def test_a_cancellation_from_outside_propagates_even_when_the_phase_ended_too() -> None:
    async def body() -> None:
        task = current()
        with Phase(task, None) as phase:
            phase.stop_now()
            task.cancel()  # someone else's cancellation, requested in the same turn
            await asyncio.sleep(10)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(body())

    async def alone() -> None:
        with Phase(current(), None) as phase:
            phase.stop_now()
            await asyncio.sleep(10)

    with pytest.raises(TimeoutError):  # the same block without the other cancellation
        await asyncio.create_task(alone())


async def test_cancellations_pending_at_entry_are_not_the_phases() -> None:
    async def body() -> str:
        task = current()
        task.cancel()  # requested before the phase starts
        with Phase(task, 0.01):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(10)  # the phase's own expiry
        return "unreachable"

    task = asyncio.create_task(body())
    with pytest.raises(TimeoutError):  # the phase's cancellation: its count is above the entry's
        await task
