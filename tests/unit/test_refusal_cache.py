"""The local rate-refusal cache (gateway/admission/controller.py `RefusalCache`): a rate refusal
of the shared store is answered locally, with no store call, until the moment it could end."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission, RefusalCache
from gateway.admission.headers import LimitHeaders, limit_headers, policy_header, retry_after_seconds
from gateway.metrics import Metrics
from gateway.store.base import AdmitResult, QueueSpot, RateBucket, SlotBucket, StoreError
from gateway.store.memory import MemoryStore


def make_plan(rate: int = 2, window_ms: int = 60_000, slots: int = 5, wait: float = 0.0) -> AdmissionPlan:
    """A fresh plan object each call, as a config (re)load builds them."""
    return AdmissionPlan(
        "p",
        rates=(RateBucket("gw:{k:1}:r:rpm", rate, window_ms),),
        rate_info=(BucketInfo("rpm", rate, window_ms / 1000),),
        slots=(SlotBucket("gw:{k:1}:c:requests", slots),),
        slot_info=(BucketInfo("requests", slots, 0.0),),
        wait=wait,
    )


class Clock:
    """Seconds, moved by hand; shared by the store and the cache."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(MemoryStore):
    """The memory store, counting admission calls; `advance_during_call` moves the clock while a
    call is in flight (as a store round trip takes time)."""

    def __init__(self, clock: Clock, advance_during_call: float = 0.0) -> None:
        super().__init__(30.0, clock=clock)
        self.admits = 0
        self._clock_ref = clock
        self._advance = advance_during_call

    async def admit(
        self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str,
        queue: QueueSpot | None = None, **_: object,
    ) -> AdmitResult:
        self.admits += 1
        self._clock_ref.now += self._advance
        return await super().admit(rates, slots, lease_id, queue)


def admission_on(store: CountingStore, clock: Clock) -> Admission:
    return Admission(store, on_error="deny", metrics=Metrics(), refusals=RefusalCache(clock))


def fill(admission: Admission, plan: AdmissionPlan, times: int) -> list[AdmitResult]:
    async def run() -> list[AdmitResult]:
        results = []
        for _ in range(times):
            ticket = await admission.admit(plan)
            admission.release(plan, ticket)
            assert ticket.result is not None
            results.append(ticket.result)
        return results

    return asyncio.run(run())


def test_a_cached_refusal_makes_no_store_call() -> None:
    clock = Clock()
    store = CountingStore(clock)
    metrics = Metrics()
    admission = Admission(store, on_error="deny", metrics=metrics, refusals=RefusalCache(clock))
    plan = make_plan(rate=2)
    results = fill(admission, plan, 10)
    assert [r.admitted for r in results] == [True, True] + [False] * 8
    assert all(r.reason == "rate" for r in results[2:])
    assert store.admits == 3  # two admissions and the first refusal; the other 7 came from the cache
    metrics.flush()
    assert metrics.registry.get_sample_value("gateway_cached_refusals_total") == 7


def test_retry_after_and_the_reset_count_down_from_the_cached_deadline() -> None:
    clock = Clock()
    store = CountingStore(clock)
    admission = admission_on(store, clock)
    plan = make_plan(rate=1, window_ms=60_000, slots=5)
    first, refused = fill(admission, plan, 2)
    assert refused.retry_after_ms == 60_000 and retry_after_seconds(refused) == 60
    headers = LimitHeaders(plan, frozenset({"x-ratelimit", "ietf"}), policy_header(plan))

    clock.now += 20.5
    (cached,) = fill(admission, plan, 1)
    assert store.admits == 2
    assert cached.retry_after_ms == 39_500 and retry_after_seconds(cached) == 40
    values = dict(headers(cached))
    assert values[b"x-ratelimit-reset"] == b"40" and values[b"x-ratelimit-remaining"] == b"0"
    # no slot item: the slots may have been taken or freed since the store was asked
    assert values[b"ratelimit"] == b'"rpm";r=0;t=40'


def test_a_cached_refusal_says_nothing_about_the_slots() -> None:
    """The store's refusal carries its slot numbers; the cached one (the slots may have been
    taken or freed since) leaves every concurrency header out rather than repeat stale ones."""
    clock = Clock()
    store = CountingStore(clock)
    admission = admission_on(store, clock)
    plan = make_plan(rate=1, window_ms=60_000, slots=5)
    families = frozenset({"concurrency", "x-concurrent", "x-ratelimit", "ietf"})
    headers = LimitHeaders(plan, families, policy_header(plan))
    _, from_store, from_cache = fill(admission, plan, 3)
    assert store.admits == 2
    fresh, cached = dict(headers(from_store)), dict(headers(from_cache))
    assert fresh[b"x-concurrent-current"] == b"0" and fresh[b"concurrency-remaining"] == b"5"
    assert not any(name.startswith((b"concurrency-", b"x-concurrent-")) for name in cached)
    assert cached[b"ratelimit"] == b'"rpm";r=0;t=60'
    assert cached[b"ratelimit-policy"] == fresh[b"ratelimit-policy"]  # the policy itself is fixed
    assert limit_headers(plan, from_cache, families, policy_header(plan)) == headers(from_cache)


def test_the_cache_expires_exactly_at_the_deadline_and_the_store_then_admits() -> None:
    clock = Clock()
    store = CountingStore(clock)
    admission = admission_on(store, clock)
    plan = make_plan(rate=1, window_ms=10_000)
    fill(admission, plan, 2)  # admitted, then refused for 10 s
    clock.now += 9.999
    (last_cached,) = fill(admission, plan, 1)
    assert not last_cached.admitted and last_cached.retry_after_ms == 1 and store.admits == 2
    clock.now += 0.001  # exactly the deadline: the store is asked again, and the window has room
    (at_deadline,) = fill(admission, plan, 1)
    assert at_deadline.admitted and store.admits == 3


def test_the_deadline_counts_from_before_the_store_call() -> None:
    clock = Clock()
    store = CountingStore(clock, advance_during_call=0.25)  # each store call "takes" 250 ms
    admission = admission_on(store, clock)
    plan = make_plan(rate=1, window_ms=10_000)
    fill(admission, plan, 2)  # admitted at 1000.25; refused at 1000.5 with t = 9.75 s: free at 1010.25
    assert store.admits == 2
    clock.now = 1010.0 - 0.001  # the cache's deadline is 1000.25 + 9.75 = 1010.0, before the true one
    fill(admission, plan, 1)
    assert store.admits == 2
    clock.now = 1010.0
    fill(admission, plan, 1)
    assert store.admits == 3  # asked again, never later than the store would admit


def test_a_new_plan_object_from_a_reload_misses_the_cache() -> None:
    clock = Clock()
    store = CountingStore(clock)
    admission = admission_on(store, clock)
    fill(admission, make_plan(rate=1), 2)
    assert store.admits == 2
    raised = make_plan(rate=5)  # a reload raised the limit: same buckets, new plan
    (result,) = fill(admission, raised, 1)
    assert result.admitted and store.admits == 3


def test_concurrency_refusals_are_not_cached() -> None:
    clock = Clock()
    store = CountingStore(clock)
    admission = admission_on(store, clock)
    plan = make_plan(rate=100, slots=1)

    async def run() -> list[bool]:
        held = await admission.admit(plan)
        refused = [(await admission.admit(plan)).admitted for _ in range(3)]
        admission.release(plan, held)
        return [held.admitted, *refused, (await admission.admit(plan)).admitted]

    assert asyncio.run(run()) == [True, False, False, False, True]
    assert store.admits == 5 and len(admission.refusals) == 0


def test_plans_with_wait_get_their_rate_refusals_cached() -> None:
    clock = Clock()
    store = CountingStore(clock)
    admission = admission_on(store, clock)
    plan = make_plan(rate=1, wait=2.0)
    results = fill(admission, plan, 4)
    assert [r.admitted for r in results] == [True, False, False, False]
    assert store.admits == 2


class FailingStore(CountingStore):
    async def admit(
        self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str,
        queue: QueueSpot | None = None, **_: object,
    ) -> AdmitResult:
        self.admits += 1
        raise StoreError("down")


def test_refusals_of_the_local_fallback_store_are_not_cached() -> None:
    clock = Clock()
    local = CountingStore(clock)
    admission = Admission(FailingStore(clock), on_error="local", metrics=Metrics(), local=local,
                          refusals=RefusalCache(clock))
    results = fill(admission, make_plan(rate=1), 4)
    assert [r.admitted for r in results] == [True, False, False, False]
    assert local.admits == 4 and len(admission.refusals) == 0


def test_the_cache_stays_bounded() -> None:
    clock = Clock()
    cache = RefusalCache(clock, max_entries=100)
    refusal = AdmitResult(False, "rate", 5_000, [1], [5_000], [0])
    plans = [make_plan() for _ in range(1000)]
    for plan in plans:
        cache.remember(plan, clock(), refusal)
        assert len(cache) <= 100
    assert cache.get(plans[-1]) is not None  # the newest entries are kept
    assert cache.get(plans[0]) is None
    clock.now += 5.0  # every entry has expired: the next one to come in clears them all
    cache.remember(plans[0], clock(), refusal)
    cache.remember(make_plan(), clock(), refusal)
    assert len(cache) <= 100
    for _ in range(100):
        cache.remember(make_plan(), clock(), refusal)
    assert cache.get(plans[-1]) is None and len(cache) <= 100


def test_only_rate_refusals_with_a_retry_time_are_remembered() -> None:
    clock = Clock()
    cache = RefusalCache(clock)
    plan = make_plan()
    cache.remember(plan, clock(), AdmitResult(True, None, 0, [0], [60_000], [0]))
    cache.remember(plan, clock(), AdmitResult(False, "concurrency", 0, [0], [60_000], [5]))
    cache.remember(plan, clock(), AdmitResult(False, "rate", 0, [2], [0], [0]))
    assert cache.get(plan) is None


def test_a_cached_refusal_leaves_out_the_rate_limits_that_did_not_refuse() -> None:
    """Another route may spend a shared limit while a refusal is cached: only the refusing
    limit's numbers (full until its t) are still known, so only its IETF item is sent."""
    clock = Clock()
    store = CountingStore(clock)
    admission = admission_on(store, clock)
    plan = AdmissionPlan(
        "p",
        rates=(RateBucket("gw:{k:1}:r:rpm", 100, 60_000), RateBucket("gw:{k:1}:r:burst", 1, 10_000)),
        rate_info=(BucketInfo("rpm", 100, 60.0), BucketInfo("burst", 1, 10.0)),
        slots=(), slot_info=(), wait=0.0,
    )
    families = frozenset({"x-ratelimit", "ietf"})
    _, from_store, from_cache = fill(admission, plan, 3)
    assert store.admits == 2 and from_cache.from_cache
    fresh = dict(limit_headers(plan, from_store, families, policy_header(plan)))
    cached = dict(limit_headers(plan, from_cache, families, policy_header(plan)))
    assert fresh[b"ratelimit"] == b'"rpm";r=99;t=60, "burst";r=0;t=10'
    assert cached[b"ratelimit"] == b'"burst";r=0;t=10'
    assert cached[b"x-ratelimit-limit"] == b"1" and cached[b"x-ratelimit-remaining"] == b"0"
