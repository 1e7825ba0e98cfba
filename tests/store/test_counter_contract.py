"""The `exact: false` part of the store contract: a rate bucket counted by the sliding-window
counter (gateway/store/window_counter.py), on every backend (memory, fakeredis, real Redis).

admit.lua mirrors the Python module, so every backend must give the numbers the module gives,
to the millisecond. The driven clock starts on a fixed-window boundary (1e9 ms is a multiple
of every window used here), which keeps the hand-worked numbers readable."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import redis.asyncio as aredis

from gateway.store import window_counter as wc
from gateway.store.base import AdmitResult, RateBucket
from gateway.store.window_counter import CounterState
from tests.store.conftest import Backend, DrivenClock, counter, rate, slot
from tests.store.test_jobs_contract import jobs_of

pytestmark = pytest.mark.anyio


async def test_counter_admits_the_limit_and_retries_after_the_window_rolls_over(
    backend: Backend, clock: DrivenClock
) -> None:
    store = await backend.started(clock=clock)
    rps = counter("rps", 3, 1000)
    results = []
    for number in range(4):  # t0, +100, +200, +300
        results.append(await store.admit([rps], [], f"l{number}"))
        clock.advance_ms(100)
    assert [r.admitted for r in results] == [True, True, True, False]
    assert [r.rate_counts for r in results] == [[0], [1], [2], [3]]
    # One admission fades out over the next fixed window: estimate 1 -> 0 at t0+2000.
    assert results[0].rate_reset_ms == [2000]
    refused = results[3]
    assert refused.reason == "rate"
    # In the next window the 3 weigh 3 * (1 - f): <= 2 from f = 1/3, i.e. 700 + 333.3 ms on.
    assert refused.retry_after_ms == 1034
    assert refused.rate_reset_ms == [1034]
    clock.advance_ms(1033 - 100)  # t0+1333: one ms early
    early = await store.admit([rps], [], "early")
    assert (early.admitted, early.retry_after_ms, early.rate_counts) == (False, 1, [3])
    clock.advance_ms(1)  # t0+1334: estimate 1.998
    on_time = await store.admit([rps], [], "on-time")
    assert (on_time.admitted, on_time.rate_counts, on_time.rate_reset_ms) == (True, [2], [333])
    again = await store.admit([rps], [], "again")  # estimate 2.998
    assert (again.admitted, again.rate_counts, again.retry_after_ms) == (False, [3], 333)


async def test_counter_may_exceed_the_limit_in_a_sliding_window_but_within_its_bound(
    backend: Backend, clock: DrivenClock
) -> None:
    """The documented error: admissions bunched at the end of a fixed window still weigh
    (1 - f) in the next, so (t0+334, t0+1334] holds 4 admissions for a limit of 3
    (limit + previous * f = 3 + 3 * 0.334)."""
    store = await backend.started(clock=clock)
    rps = counter("rps", 3, 1000)
    clock.advance_ms(999)
    assert all([(await store.admit([rps], [], f"end-{n}")).admitted for n in range(3)])
    clock.advance_ms(1)  # t0+1000: a new fixed window, the previous one counts in full
    first = await store.admit([rps], [], "boundary")
    assert (first.admitted, first.rate_counts, first.retry_after_ms) == (False, [3], 334)
    clock.advance_ms(334)
    assert (await store.admit([rps], [], "fourth")).admitted


async def test_counter_refused_by_another_bucket_writes_nothing(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    full, approx, requests = rate("full", 1, 10_000), counter("approx", 5, 10_000), slot("requests", 2)
    assert (await store.admit([full], [], "fills-it")).admitted
    refused = await store.admit([full, approx], [requests], "refused")
    assert (refused.admitted, refused.reason, refused.rate_counts) == (False, "rate", [1, 0])
    assert refused.rate_reset_ms[1] == 0  # an empty counter: nothing to fade
    after = await store.admit([approx], [requests], "next")
    assert (after.admitted, after.rate_counts) == (True, [0])
    store.release([requests], "next")


@dataclass
class Model:
    """What every store must answer, from the pure module alone (all-or-none over buckets)."""

    states: dict[str, CounterState | None]

    def admit(self, buckets: list[RateBucket], now: float) -> tuple[bool, int, list[int], list[int]]:
        views = [wc.seen_at(self.states.get(b.key), now, b.window_ms) for b in buckets]
        fits = [wc.admits(view, now, b.limit) for view, b in zip(views, buckets, strict=True)]
        admitted = all(fits)
        retry = max(
            (wc.retry_after_ms(v, now, b.limit) for v, b, ok in zip(views, buckets, fits, strict=True) if not ok),
            default=0,
        )
        counts = [wc.whole_count(view, now) for view in views]
        if admitted:
            views = [wc.after_admission(view) for view in views]
            self.states.update({b.key: view for b, view in zip(buckets, views, strict=True)})
        return admitted, retry, counts, [wc.reset_ms(view, now) for view in views]


async def test_every_backend_answers_what_the_pure_counter_answers(backend: Backend, clock: DrivenClock) -> None:
    """Seeded random traffic over two counter buckets of different sizes: admit.lua and the
    memory store both match gateway/store/window_counter.py, decision by decision."""
    store = await backend.started(clock=clock)
    small, large = counter("small", 5, 1000), counter("large", 20, 7000)
    model = Model({})
    rnd = random.Random(20240611)
    differences: list[tuple[int, AdmitResult, tuple[bool, int, list[int], list[int]]]] = []
    refused = 0
    for n in range(400):
        buckets = [small, large] if rnd.random() < 0.7 else [large]
        expected = model.admit(buckets, clock.ms)
        got = await store.admit(buckets, [], f"r{n}")
        if (got.admitted, got.retry_after_ms, got.rate_counts, got.rate_reset_ms) != expected:
            differences.append((n, got, expected))
        refused += not got.admitted
        clock.advance_ms(rnd.choice([0, 0, 1, 3, 40, 97, 250, 999, 1500]))
    assert differences == []
    assert 50 < refused < 350  # both decisions were exercised


async def test_usage_reports_the_estimate_rounded_up(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    rps, rpm = counter("rps", 10, 1000), rate("rpm", 10, 60_000)
    for n in range(3):
        assert (await store.admit([rps, rpm], [], f"l{n}")).admitted
    assert (await jobs.usage([rps, rpm], [])).rate_counts == [3, 3]
    clock.advance_ms(1500)  # the 3 weigh half now
    assert (await jobs.usage([rps, rpm], [])).rate_counts == [2, 3]
    clock.advance_ms(500)
    assert (await jobs.usage([rps, rpm], [])).rate_counts == [0, 3]


async def test_a_reload_that_changes_the_window_keeps_the_count(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    for n in range(4):
        assert (await store.admit([counter("rps", 10, 1000)], [], f"l{n}")).admitted
    clock.advance_ms(500)
    # Now 10 per minute: the 4 still counted stay counted in the new window.
    longer = await store.admit([counter("rps", 10, 60_000)], [], "after-reload")
    assert (longer.admitted, longer.rate_counts) == (True, [4])
    clock.advance_ms(1000)  # the old 1 s window would have forgotten them; the new one has not
    assert (await store.admit([counter("rps", 10, 60_000)], [], "later")).rate_counts == [5]


async def test_counter_state_is_a_small_hash_whatever_the_count(backend: Backend, clock: DrivenClock) -> None:
    """O(1) memory: four fields after 300 admissions, a TTL of at most two windows (the
    fixture's teardown also checks that every key has one)."""
    if not backend.is_redis:
        pytest.skip("Redis representation")
    assert backend.make_client is not None
    store = await backend.started(clock=clock)
    big = counter("big", 1000, 60_000)
    for n in range(300):
        assert (await store.admit([big], [], f"l{n}")).admitted
    client: aredis.Redis = backend.make_client()
    try:
        assert await client.type(big.key) == b"hash"
        assert await client.hlen(big.key) == 4
        assert 60_000 < await client.pttl(big.key) <= 120_000
    finally:
        await client.aclose()
