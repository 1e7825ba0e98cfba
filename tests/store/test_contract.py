"""The store contract (gateway/store/base.py), run on every backend: the memory store,
RedisStore on fakeredis (Lua via lupa) and RedisStore on a real redis-server.

Time is driven (a clock passed to the store; Redis gets it as ARGV) except where a test
says it exercises the real clock. The `backend` fixture's teardown checks that every Redis
key has a TTL and that every slot set is empty."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest
import redis.asyncio as aredis

from gateway.store.base import StoreError
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.store.conftest import Backend, DrivenClock, RecordingObserver, rate, slot

pytestmark = pytest.mark.anyio


# -- rate windows -------------------------------------------------------------------------


async def test_rate_admits_exactly_limit_and_says_when_to_retry(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    rpm = rate("rpm", 3, 1000)
    results = []
    for number in range(4):
        results.append(await store.admit([rpm], [], f"lease-{number}"))
        clock.advance_ms(100)
    assert [result.admitted for result in results] == [True, True, True, False]
    assert [result.rate_counts for result in results] == [[0], [1], [2], [3]]
    # The first admission (t0) leaves the window at t0+1000; the refusal came at t0+300.
    refused = results[3]
    assert refused.reason == "rate"
    assert refused.retry_after_ms == 700
    assert refused.rate_reset_ms == [700]
    assert refused.slot_counts == []
    assert [result.reason for result in results[:3]] == [None, None, None]
    assert [result.retry_after_ms for result in results[:3]] == [0, 0, 0]


async def test_window_slides_exactly_at_its_boundary(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    rps = rate("rps", 2, 1000)
    assert (await store.admit([rps], [], "a")).admitted  # t0
    clock.advance_ms(400)
    assert (await store.admit([rps], [], "b")).admitted  # t0+400
    clock.advance_ms(599)  # t0+999: "a" is still inside (now - window, now]
    early = await store.admit([rps], [], "c")
    assert not early.admitted
    assert early.retry_after_ms == 1
    clock.advance_ms(1)  # t0+1000: "a" has left the window, exactly now
    on_time = await store.admit([rps], [], "d")
    assert on_time.admitted
    assert on_time.rate_counts == [1]
    assert on_time.rate_reset_ms == [400]  # "b" leaves at t0+1400
    again = await store.admit([rps], [], "e")
    assert not again.admitted
    assert again.retry_after_ms == 400


async def test_retry_after_waits_for_every_refusing_bucket(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    short, long, roomy = rate("short", 1, 1000), rate("long", 1, 5000), rate("roomy", 10, 2000)
    assert (await store.admit([short, long], [], "first")).admitted
    clock.advance_ms(200)
    both = await store.admit([short, long, roomy], [], "second")
    assert not both.admitted
    assert both.reason == "rate"
    assert both.retry_after_ms == 4800
    assert both.rate_counts == [1, 1, 0]
    assert both.rate_reset_ms == [800, 4800, 2000]
    one = await store.admit([short, roomy], [], "third")
    assert one.retry_after_ms == 800


async def test_lowered_limit_waits_for_enough_entries_to_leave(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    for number in range(3):  # at t0, t0+100, t0+200
        assert (await store.admit([rate("rpm", 3, 1000)], [], f"l{number}")).admitted
        clock.advance_ms(100)
    # A reload lowered the limit to 1: two more entries must leave, the last at t0+200+1000.
    refused = await store.admit([rate("rpm", 1, 1000)], [], "after-reload")
    assert refused.rate_counts == [3]
    assert refused.retry_after_ms == 900
    assert refused.rate_reset_ms == [700]


async def test_reset_counts_this_request_when_admitted(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    window = rate("rpm", 5, 60_000)
    first = await store.admit([window], [], "a")
    assert first.rate_reset_ms == [60_000]
    clock.advance_ms(250)
    second = await store.admit([window], [], "b")
    assert second.rate_counts == [1]
    assert second.rate_reset_ms == [59_750]


# -- all or nothing -----------------------------------------------------------------------


async def test_refused_by_rate_writes_nothing_anywhere(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    full, other, requests = rate("full", 1, 10_000), rate("other", 5, 10_000), slot("requests", 2)
    assert (await store.admit([full], [], "fills-it")).admitted
    refused = await store.admit([full, other], [requests], "refused")
    assert not refused.admitted
    assert refused.reason == "rate"
    assert refused.rate_counts == [1, 0]
    assert refused.slot_counts == [0]
    # The refused request took no budget in "other" and no slot.
    after = await store.admit([other], [requests], "next")
    assert after.admitted
    assert after.rate_counts == [0]
    assert after.slot_counts == [0]
    store.release([requests], "next")


async def test_refused_by_concurrency_writes_nothing_anywhere(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    budget, one_slot, spare = rate("budget", 5, 10_000), slot("one", 1), slot("spare", 3)
    assert (await store.admit([], [one_slot], "holder")).admitted
    refused = await store.admit([budget], [spare, one_slot], "blocked")
    assert not refused.admitted
    assert refused.reason == "concurrency"
    assert refused.retry_after_ms == 0
    assert refused.rate_counts == [0]
    assert refused.slot_counts == [0, 1]
    probe = await store.admit([budget], [spare], "probe")
    assert probe.rate_counts == [0]
    assert probe.slot_counts == [0]
    store.release([spare], "probe")
    store.release([one_slot], "holder")


async def test_rate_wins_the_reason_when_both_refuse(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    window, one_slot = rate("rpm", 1, 1000), slot("one", 1)
    assert (await store.admit([window], [one_slot], "holder")).admitted
    refused = await store.admit([window], [one_slot], "both")
    assert (refused.reason, refused.retry_after_ms) == ("rate", 1000)
    assert refused.slot_counts == [1]
    store.release([one_slot], "holder")


async def test_keys_of_one_call_must_share_a_hash_tag(backend: Backend, clock: DrivenClock) -> None:
    if not backend.is_redis:
        pytest.skip("hash tags only matter to Redis")
    store = await backend.started(clock=clock)
    with pytest.raises(ValueError, match="hash tags"):
        await store.admit([rate("rpm", 1, 1000, tag="a")], [slot("requests", 1, tag="b")], "mixed")


async def test_no_buckets_admits(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    result = await store.admit([], [], "nothing-to-check")
    assert result.admitted
    assert (result.rate_counts, result.rate_reset_ms, result.slot_counts) == ([], [], [])


# -- slots and leases ---------------------------------------------------------------------


async def test_slots_admit_up_to_limit_and_free_on_release(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    requests = slot("requests", 2)
    first = await store.admit([], [requests], "a")
    second = await store.admit([], [requests], "b")
    third = await store.admit([], [requests], "c")
    assert [first.slot_counts, second.slot_counts, third.slot_counts] == [[0], [1], [2]]
    assert (first.admitted, second.admitted, third.admitted) == (True, True, False)
    assert third.reason == "concurrency"
    store.release([requests], "a")
    await store.flush()
    fourth = await store.admit([], [requests], "d")
    assert fourth.admitted
    assert fourth.slot_counts == [1]
    store.release([requests], "b")
    store.release([requests], "d")


async def test_release_is_idempotent(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    requests = slot("requests", 1)
    assert (await store.admit([], [requests], "a")).admitted
    store.release([requests], "a")
    store.release([requests], "a")
    store.release([requests], "never-admitted")
    store.release([slot("never-used", 1)], "a")
    await store.flush()
    again = await store.admit([], [requests], "b")
    assert again.admitted
    assert again.slot_counts == [0]
    store.release([requests], "b")
    store.release([requests], "b")


async def test_release_from_a_cancelled_task_frees_the_slot(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    requests = slot("requests", 1)
    admitted = asyncio.Event()

    async def request() -> None:
        assert (await store.admit([], [requests], "cancelled")).admitted
        try:
            admitted.set()
            await asyncio.sleep(30)
        finally:
            store.release([requests], "cancelled")  # synchronous: cancellation cannot skip it

    task = asyncio.create_task(request())
    await admitted.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.flush()
    after = await store.admit([], [requests], "next")
    assert after.admitted
    store.release([requests], "next")


async def test_expired_lease_is_reclaimed_and_counted(
    backend: Backend, clock: DrivenClock, observer: RecordingObserver
) -> None:
    # No heartbeat runs between these steps (driven time jumps): the holder looks dead.
    store = await backend.started(lease=10.0, clock=clock, observer=observer)
    requests = slot("requests", 1)
    assert (await store.admit([], [requests], "dead")).admitted
    clock.advance_ms(9_999)
    early = await store.admit([], [requests], "early")
    assert (early.admitted, early.reclaimed, early.slot_counts) == (False, 0, [1])
    clock.advance_ms(1)  # exactly `lease` after it was taken: expired
    late = await store.admit([], [requests], "late")
    assert (late.admitted, late.reclaimed, late.slot_counts) == (True, 1, [0])
    assert observer.reclaimed == 1
    # The heartbeat finds the dead lease gone: counted as lost, once.
    assert await store.renew() == 1
    assert await store.renew() == 0
    assert observer.lost == 1
    store.release([requests], "dead")
    store.release([requests], "late")


async def test_renew_keeps_a_held_lease_alive_past_its_lease(
    backend: Backend, clock: DrivenClock, observer: RecordingObserver
) -> None:
    store = await backend.started(lease=10.0, clock=clock, observer=observer)
    requests = slot("requests", 1)
    assert (await store.admit([], [requests], "held")).admitted
    clock.advance_ms(6_000)
    assert await store.renew() == 0
    clock.advance_ms(6_000)  # 12 s after it was taken, 6 s after the renewal
    blocked = await store.admit([], [requests], "other")
    assert (blocked.admitted, blocked.slot_counts, blocked.reclaimed) == (False, [1], 0)
    clock.advance_ms(4_000)  # 10 s after the renewal: expired
    taken = await store.admit([], [requests], "third")
    assert (taken.admitted, taken.reclaimed) == (True, 1)
    assert observer.lost == 0
    store.release([requests], "held")
    store.release([requests], "third")
    assert await store.renew() == 0  # released leases are not renewed, nor counted lost


async def test_heartbeat_runs_in_the_background(backend: Backend, clock: DrivenClock) -> None:
    # lease 0.6 s, heartbeat every 0.2 s of real time; the driven clock follows real time
    # for 1.5 s (2.5 leases). Without the heartbeat the lease would expire.
    store = await backend.started(lease=0.6, clock=clock)
    requests = slot("requests", 1)
    assert (await store.admit([], [requests], "held")).admitted
    for _ in range(30):
        await asyncio.sleep(0.05)
        clock.advance_ms(50)
    blocked = await store.admit([], [requests], "other")
    assert (blocked.admitted, blocked.slot_counts) == (False, [1])
    store.release([requests], "held")


async def test_lease_released_in_one_bucket_stays_in_the_others(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    first, second = slot("first", 1), slot("second", 1)
    assert (await store.admit([], [first, second], "both")).admitted
    store.release([first], "both")
    await store.flush()
    assert (await store.admit([], [first], "x")).admitted
    assert not (await store.admit([], [second], "y")).admitted
    store.release([first], "x")
    store.release([first, second], "both")


# -- many at once ---------------------------------------------------------------------------


async def test_concurrent_admits_admit_exactly_the_limit(backend: Backend, clock: DrivenClock) -> None:
    # 600 calls in one tick: several pipelined batches in parallel, at most 4 at a time.
    # (fakeredis runs 600 scripts in-process, interpreted: give it time under a loaded suite)
    store = await backend.started(clock=clock, max_connections=4, timeout=5.0)
    narrow, wide, requests = rate("narrow", 50, 60_000), rate("wide", 80, 60_000), slot("requests", 40)

    async def burst(prefix: str) -> list[str]:
        results = await asyncio.gather(
            *(store.admit([narrow, wide], [requests], f"{prefix}-{n}") for n in range(600))
        )
        return [f"{prefix}-{n}" for n, result in enumerate(results) if result.admitted]

    first = await burst("first")
    assert len(first) == 40  # the slots bind first
    for lease_id in first:
        store.release([requests], lease_id)
    await store.flush()
    second = await burst("second")
    assert len(second) == 10  # then the narrow window: 50 - 40
    refused = await store.admit([narrow, wide], [requests], "one-more")
    assert (refused.reason, refused.rate_counts, refused.slot_counts) == ("rate", [50, 50], [10])
    for lease_id in second:
        store.release([requests], lease_id)


async def test_two_replicas_share_one_view(backend: Backend, clock: DrivenClock) -> None:
    if not backend.is_redis:
        pytest.skip("the memory store is one process by definition")
    replicas = [await backend.started(clock=clock) for _ in range(2)]
    window, requests = rate("rpm", 37, 60_000), slot("requests", 11)
    results = await asyncio.gather(
        *(replicas[n % 2].admit([window], [], f"r-{n}") for n in range(100)),
        *(replicas[n % 2].admit([], [requests], f"s-{n}") for n in range(100)),
    )
    assert sum(result.admitted for result in results[:100]) == 37
    assert sum(result.admitted for result in results[100:]) == 11
    for n, result in enumerate(results[100:]):
        if result.admitted:
            replicas[n % 2].release([requests], f"s-{n}")


# -- readiness and failures -----------------------------------------------------------------


async def test_check_ready_runs_the_script_and_leaves_nothing_behind(
    backend: Backend, clock: DrivenClock
) -> None:
    store = await backend.started(clock=clock)
    await store.check_ready()
    await store.check_ready()
    # Teardown checks the probe left no key without a TTL and no held slot.


async def test_cancelled_admit_does_not_leak_its_slot(backend: Backend, clock: DrivenClock) -> None:
    if not backend.is_redis:
        pytest.skip("memory admission never awaits: it cannot be cancelled half way")
    store = await backend.started(clock=clock)
    requests = slot("requests", 1)
    task = asyncio.create_task(store.admit([], [requests], "abandoned"))
    await asyncio.sleep(0)  # the call is queued; its batch is about to go out
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 2
    while True:
        await store.flush()
        probe = await store.admit([], [requests], "probe")
        if probe.admitted or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    assert probe.admitted
    store.release([requests], "probe")


async def test_redis_time_drives_windows_and_leases(backend: Backend) -> None:
    if not backend.is_redis:
        pytest.skip("Redis TIME only")
    store = backend.new(lease=0.3, clock=None)  # not started: no heartbeat
    window, requests = rate("rps", 2, 1000), slot("requests", 1)
    assert (await store.admit([window], [requests], "a")).admitted
    assert (await store.admit([window], [], "b")).admitted
    refused = await store.admit([window], [], "c")
    assert not refused.admitted
    assert 0 < refused.retry_after_ms <= 1000
    await asyncio.sleep(0.35)  # past the lease in Redis time (the key itself lives 0.6 s)
    taken = await store.admit([], [requests], "d")
    assert (taken.admitted, taken.reclaimed) == (True, 1)
    store.release([requests], "a")
    store.release([requests], "d")


async def test_unreachable_redis_raises_store_error_and_recovers() -> None:
    server = fakeredis.FakeServer()
    observer = RecordingObserver()
    store = RedisStore.from_client(
        fakeredis.FakeAsyncRedis(server=server), prefix="t", timeout=0.5, lease=10.0, observer=observer
    )
    await store.start()
    requests = slot("requests", 1)
    server.connected = False
    with pytest.raises(StoreError):
        await store.admit([], [requests], "a")
    assert observer.errors["admit"] == 1
    store.release([requests], "a")  # never raises
    await store.flush()
    assert observer.errors["release"] >= 1
    with pytest.raises(StoreError):
        await store.check_ready()
    assert observer.errors["ready"] == 1
    server.connected = True
    assert (await store.admit([], [requests], "b")).admitted
    store.release([requests], "b")
    await store.aclose()
    client = fakeredis.FakeAsyncRedis(server=server)
    assert await client.zcard(requests.key) == 0
    await client.aclose()


async def test_reply_for_another_call_is_refused() -> None:
    """A connection one reply out of step (redis-py CVE-2023-28858 class) must not hand a
    caller someone else's decision: admit.lua echoes the lease id and the store checks it."""
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    observer = RecordingObserver()
    store = RedisStore.from_client(client, prefix="t", timeout=0.5, lease=10.0, observer=observer)
    await store.start()
    run_pipeline = store._transport._pipeline  # type: ignore[attr-defined]

    async def swapped(sha: str, calls: list, *rest: object) -> list:  # type: ignore[type-arg]
        return list(reversed(await run_pipeline(sha, calls, *rest)))  # type: ignore[arg-type]

    store._transport._pipeline = swapped  # type: ignore[attr-defined]
    window = rate("rpm", 10, 1000)
    results = await asyncio.gather(
        store.admit([window], [], "first"), store.admit([window], [], "second"), return_exceptions=True
    )
    assert all(isinstance(result, StoreError) for result in results)
    assert "another call" in str(results[0])
    assert observer.errors["admit"] == 2
    await store.aclose()


async def test_memory_store_drops_idle_buckets() -> None:
    clock = DrivenClock()
    store = MemoryStore(0.06, clock=clock)  # heartbeat (and sweep) every 20 ms
    await store.start()
    try:
        for n in range(50):
            await store.admit([rate(f"r{n}", 1, 1000, tag=f"k{n}")], [slot("s", 2, tag=f"k{n}")], f"l{n}")
        for n in range(25):
            store.release([slot("s", 2, tag=f"k{n}")], f"l{n}")
        clock.advance_ms(2000)  # every window and every unreleased lease is over
        deadline = time.monotonic() + 2
        while (store._windows or store._slots) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert store._windows == {}
        assert store._slots == {}
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_redis_store_from_url_talks_to_real_redis(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="t", timeout=0.5, lease=10.0)
    await store.start()
    try:
        await store.check_ready()
        assert (await store.admit([rate("rpm", 1, 1000)], [], "a")).admitted
    finally:
        await store.aclose()
    client = aredis.Redis.from_url(redis_url)
    try:
        assert await client.zcard(rate("rpm", 1, 1000).key) == 1
    finally:
        await client.aclose()
