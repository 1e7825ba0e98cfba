"""The waiting part of the store contract (gateway/store/base.py), on every backend: waiter
queues in arrival order, newcomers never overtaking a waiter, waiter entries expiring, and
wake-ups reaching the waiters of a bucket (across replicas on Redis).

Time is driven; the `backend` fixture's teardown checks that every Redis key has a TTL and
that every slot set and queue (":s:" in the name) is empty."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store.base import QueueSpot
from tests.store.conftest import Backend, DrivenClock, rate, slot

pytestmark = pytest.mark.anyio

TTL_MS = 5_000


def spot(waiter: str, arrival: str = "") -> QueueSpot:
    return QueueSpot(waiter, TTL_MS, arrival)


async def queued(store: object, slots: list, waiter: str) -> str:  # type: ignore[type-arg]
    result = await store.admit([], slots, waiter, spot(waiter))  # type: ignore[attr-defined]
    assert (result.admitted, result.reason, result.queued) == (False, "concurrency", True)
    assert result.arrival
    return str(result.arrival)


async def test_newcomer_queues_when_full_and_waiters_are_served_in_order(
    backend: Backend, clock: DrivenClock
) -> None:
    store = await backend.started(clock=clock)
    one = [slot("requests", 1)]
    assert (await store.admit([], one, "holder", spot("holder"))).admitted
    first = await queued(store, one, "first")
    clock.advance_ms(10)
    second = await queued(store, one, "second")
    store.release(one, "holder")
    await store.flush()
    # The slot is free, but "first" arrived earlier: "second" waits on.
    later = await store.admit([], one, "second", spot("second", second))
    assert (later.admitted, later.queued, later.slot_counts) == (False, True, [1])
    # A newcomer does not overtake either of them, and joins the back.
    clock.advance_ms(10)
    newcomer = await store.admit([], one, "newcomer", spot("newcomer"))
    assert (newcomer.admitted, newcomer.queued, newcomer.slot_counts) == (False, True, [2])
    served = await store.admit([], one, "first", spot("first", first))
    assert (served.admitted, served.queued, served.slot_counts) == (True, False, [0])
    store.release(one, "first")
    await store.flush()
    assert not (await store.admit([], one, "newcomer", spot("newcomer", newcomer.arrival))).admitted
    assert (await store.admit([], one, "second", spot("second", second))).admitted
    store.release(one, "second")
    store.leave_queue(one, "newcomer")


async def test_a_waiter_is_admitted_when_free_slots_exceed_its_place(
    backend: Backend, clock: DrivenClock
) -> None:
    store = await backend.started(clock=clock)
    two = [slot("requests", 2)]
    for holder in ("h1", "h2"):
        assert (await store.admit([], two, holder, spot(holder))).admitted
    first = await queued(store, two, "first")
    clock.advance_ms(1)
    second = await queued(store, two, "second")
    store.release(two, "h1")
    store.release(two, "h2")
    await store.flush()
    # Two free slots, one waiter ahead: the second waiter need not wait for the first.
    assert (await store.admit([], two, "second", spot("second", second))).admitted
    assert (await store.admit([], two, "first", spot("first", first))).admitted
    store.release(two, "first")
    store.release(two, "second")


async def test_requests_that_do_not_wait_ignore_the_queue(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    one = [slot("requests", 1)]
    assert (await store.admit([], one, "holder", spot("holder"))).admitted
    await queued(store, one, "waiter")
    store.release(one, "holder")
    await store.flush()
    plain = await store.admit([], one, "plain")  # no QueueSpot: the classic rule
    assert (plain.admitted, plain.queued, plain.slot_counts) == (True, False, [0])
    store.release(one, "plain")
    store.leave_queue(one, "waiter")


async def test_waiter_entries_expire_unless_refreshed(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    one = [slot("requests", 1)]
    assert (await store.admit([], one, "holder", spot("holder"))).admitted
    stale = await queued(store, one, "stale")
    clock.advance_ms(10)
    live = await queued(store, one, "live")
    store.release(one, "holder")
    await store.flush()
    clock.advance_ms(TTL_MS - 20)
    assert not (await store.admit([], one, "live", spot("live", live))).admitted  # refreshed; "stale" ahead
    clock.advance_ms(20)  # "stale" was last refreshed TTL_MS ago: gone (its replica died)
    assert (await store.admit([], one, "live", spot("live", live))).admitted
    # Had the stale waiter only stalled, its next check puts it back at its place.
    back = await store.admit([], one, "stale", spot("stale", stale))
    assert (back.admitted, back.queued, back.slot_counts) == (False, True, [1])
    store.release(one, "live")
    store.leave_queue(one, "stale")


async def test_leave_queue_lets_the_next_one_in_and_is_idempotent(
    backend: Backend, clock: DrivenClock
) -> None:
    store = await backend.started(clock=clock)
    one = [slot("requests", 1)]
    assert (await store.admit([], one, "holder", spot("holder"))).admitted
    await queued(store, one, "gone")
    clock.advance_ms(1)
    next_one = await queued(store, one, "next")
    store.release(one, "holder")
    store.leave_queue(one, "gone")  # its client disconnected
    store.leave_queue(one, "gone")
    store.leave_queue(one, "never-queued")
    await store.flush()
    assert (await store.admit([], one, "next", spot("next", next_one))).admitted
    store.release(one, "next")


async def test_a_rate_refusal_ends_the_wait(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    budget, one = rate("rpm", 2, 60_000), [slot("requests", 1)]
    assert (await store.admit([budget], one, "holder", spot("holder"))).admitted
    arrival = await store.admit([budget], one, "waiter", spot("waiter"))
    assert arrival.queued
    assert (await store.admit([budget], [], "spends-the-budget")).admitted
    refused = await store.admit([budget], one, "waiter", spot("waiter", arrival.arrival))
    assert (refused.admitted, refused.reason, refused.queued) == (False, "rate", False)
    store.release(one, "holder")
    await store.flush()
    # It left the queue: a newcomer is not behind it (only the rate budget is spent).
    newcomer = await store.admit([], one, "newcomer", spot("newcomer"))
    assert newcomer.admitted
    store.release(one, "newcomer")


async def test_a_newcomer_refused_by_rate_does_not_queue(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    budget, one = rate("rpm", 1, 60_000), [slot("requests", 1)]
    assert (await store.admit([budget], one, "holder", spot("holder"))).admitted
    refused = await store.admit([budget], one, "late", spot("late"))
    assert (refused.reason, refused.queued) == ("rate", False)
    store.release(one, "holder")
    await store.flush()
    assert (await store.admit([], one, "next", spot("next"))).admitted
    store.release(one, "next")


async def test_waiting_in_several_buckets_needs_room_in_each(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    wide, narrow = slot("wide", 3), slot("narrow", 1)
    assert (await store.admit([], [narrow], "holder", spot("holder"))).admitted
    waiting = await store.admit([], [wide, narrow], "both", spot("both"))
    assert (waiting.queued, waiting.slot_counts) == (True, [0, 1])
    # "wide" has room, but its queue holds "both": a newcomer to "wide" alone queues behind.
    behind = await store.admit([], [wide], "wide-only", spot("wide-only"))
    assert (behind.admitted, behind.slot_counts) == (True, [1])  # 1 waiter ahead, 3 slots
    store.release([wide], "wide-only")
    store.release([narrow], "holder")
    await store.flush()
    assert (await store.admit([], [wide, narrow], "both", spot("both", waiting.arrival))).admitted
    store.release([wide, narrow], "both")


async def wait_set(event: asyncio.Event, timeout: float = 2.0) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def test_releases_wake_the_watchers_of_their_buckets(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    watched, other = [slot("requests", 1)], [slot("requests", 1, tag="k2")]
    event = asyncio.Event()
    unwatch = store.watch(watched, event)
    try:
        assert await wait_set(event)  # the watch is in place (subscribed, on Redis)
        event.clear()
        assert (await store.admit([], other, "elsewhere")).admitted
        store.release(other, "elsewhere", wake=True)  # another key's bucket
        assert (await store.admit([], watched, "quiet")).admitted
        store.release(watched, "quiet")  # no wake asked
        await store.flush()
        assert not await wait_set(event, 0.3)
        assert (await store.admit([], watched, "loud")).admitted
        store.release(watched, "loud", wake=True)
        assert await wait_set(event)
        event.clear()
        store.leave_queue(watched, "someone")
        assert await wait_set(event)
    finally:
        unwatch()


async def test_a_release_on_one_replica_wakes_a_waiter_on_another(
    backend: Backend, clock: DrivenClock
) -> None:
    if not backend.is_redis:
        pytest.skip("the memory store is one process by definition")
    here, there = await backend.started(clock=clock), await backend.started(clock=clock)
    one = [slot("requests", 1)]
    assert (await there.admit([], one, "holder", spot("holder"))).admitted
    arrival = await queued(here, one, "waiter")
    event = asyncio.Event()
    unwatch = here.watch(one, event)
    try:
        assert await wait_set(event)
        event.clear()
        there.release(one, "holder", wake=True)
        assert await wait_set(event)
        assert (await here.admit([], one, "waiter", spot("waiter", arrival))).admitted
        here.release(one, "waiter")
    finally:
        unwatch()
