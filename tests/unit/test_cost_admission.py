"""Issue 18 on the admission controller, against a recording store: the charge and quotas go
to the store, the slot count rides in the lease id, the refusal cache never refuses a cheaper
request than the one the store refused and keeps a quota refusal one second at most, a
settlement rides the release once (cost-counting buckets only, never a shadow bucket that
refused), shadow refusals are counted, and the local fallback divides quotas like rates."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import QUOTA_REFUSAL_TTL, Admission, RefusalCache, Ticket
from gateway.metrics import Metrics
from gateway.store.base import (
    AdmitResult,
    Charge,
    QuotaBucket,
    RateBucket,
    Settlement,
    SlotBucket,
    StoreError,
    lease_members,
)
from gateway.store.memory import MemoryStore

RPM = RateBucket("gw:{k:1}:r:rpm", 10, 60_000)
CREDITS = RateBucket("gw:{k:1}:r:credits", 100, 60_000, counts_cost=True)
SHADOW = RateBucket("gw:{k:1}:r:tight", 5, 60_000, counts_cost=True, shadow=True)
MONTHLY = QuotaBucket("gw:{k:1}:q:monthly", 1000, "month")
DAILY_REQUESTS = QuotaBucket("gw:{k:1}:q:daily", 50, "1d", counts_cost=False)
BROWSERS = SlotBucket("gw:{k:1}:c:browsers", 4)

PLAN = AdmissionPlan(
    "pro",
    rates=(RPM, CREDITS, SHADOW),
    rate_info=(BucketInfo("rpm", 10, 60.0, name="rpm"), BucketInfo("credits", 100, 60.0, True, name="credits"),
               BucketInfo("tight", 5, 60.0, True, True, name="tight")),
    slots=(BROWSERS,),
    slot_info=(BucketInfo("browsers", 4, 0.0, name="browsers"),),
    wait=0.0,
    quotas=(MONTHLY, DAILY_REQUESTS),
    quota_info=(BucketInfo("monthly", 1000, 0.0, True, period="month", name="monthly"),
                BucketInfo("daily", 50, 0.0, False, period="1d", name="daily")),
)
NO_SLOTS = AdmissionPlan("pro", (CREDITS,), (BucketInfo("credits", 100, 60.0, True, name="credits"),), (), (), 0.0,
                         quotas=(MONTHLY,), quota_info=(BucketInfo("monthly", 1000, 0.0, True, period="month"),))


REQUESTS_ONLY = AdmissionPlan("p", (RPM,), (BucketInfo("rpm", 10, 60.0),), (), (), 0.0)


class Recorder:
    """A store that answers what it is told to and records every call."""

    def __init__(self) -> None:
        self.admits: list[dict[str, Any]] = []
        self.releases: list[tuple[tuple[SlotBucket, ...], str, Settlement | None]] = []
        self.answer = AdmitResult(True, None, 0, [0, 0, 0], [60_000] * 3, [0], now_ms=1_000.0,
                                  quota_counts=[0, 0], quota_reset_ms=[5_000, 5_000])
        self.fail = False

    async def admit(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str,
                    queue: Any = None, *, quotas: Sequence[QuotaBucket] = (), charge: Charge = Charge()) -> AdmitResult:
        if self.fail:
            raise StoreError("down")
        self.admits.append({"rates": tuple(rates), "slots": tuple(slots), "lease": lease_id,
                            "quotas": tuple(quotas), "charge": charge})
        return self.answer

    def release(self, slots: Sequence[SlotBucket], lease_id: str, wake: bool = False, *,
                settlement: Settlement | None = None) -> None:
        self.releases.append((tuple(slots), lease_id, settlement))

    async def check_ready(self) -> None:
        pass


def refusal(reason: str, retry_after_ms: int) -> AdmitResult:
    return AdmitResult(False, reason, retry_after_ms, [0, 100, 0], [60_000] * 3, [0],
                       quota_counts=[1000, 0], quota_reset_ms=[retry_after_ms] * 2, now_ms=1_000.0)


def test_the_charge_quotas_and_slot_weight_reach_the_store() -> None:
    store = Recorder()
    admission = Admission(store, on_error="deny", metrics=Metrics())  # type: ignore[arg-type]
    ticket = asyncio.run(admission.admit(PLAN, Charge(25, 3)))
    call = store.admits[0]
    assert call["charge"] == Charge(25, 3) and ticket.charge == Charge(25, 3)
    assert call["quotas"] == (MONTHLY, DAILY_REQUESTS) and call["rates"] == PLAN.rates
    assert ticket.lease_id.endswith("*3") and len(lease_members(ticket.lease_id)) == 3
    assert ticket.counted_in is store and ticket.store is store


def test_a_cached_rate_refusal_never_refuses_a_cheaper_request() -> None:
    now = [100.0]
    store = Recorder()
    store.answer = refusal("rate", 10_000)
    admission = Admission(store, on_error="deny", metrics=Metrics(),  # type: ignore[arg-type]
                          refusals=RefusalCache(clock=lambda: now[0]))
    first = asyncio.run(admission.admit(PLAN, Charge(5)))
    assert not first.admitted and len(store.admits) == 1
    for cost in (5, 7, 1000):  # as costly or more: refused from the cache
        assert asyncio.run(admission.admit(PLAN, Charge(cost))).result.from_cache  # type: ignore[union-attr]
    assert len(store.admits) == 1
    store.answer = Recorder().answer
    cheaper = asyncio.run(admission.admit(PLAN, Charge(4)))  # may fit: the store decides
    assert cheaper.admitted and len(store.admits) == 2
    free = asyncio.run(admission.admit(PLAN, Charge(0)))
    assert free.admitted and len(store.admits) == 3


def test_a_lower_refused_cost_replaces_the_entry_and_the_cache_counts_down() -> None:
    now = [100.0]
    cache = RefusalCache(clock=lambda: now[0])
    cache.remember(REQUESTS_ONLY, 100.0, refusal("rate", 10_000), cost=8)
    cache.remember(REQUESTS_ONLY, 100.0, refusal("rate", 10_000), cost=3)
    assert cache.get(REQUESTS_ONLY, 2) is None and cache.get(REQUESTS_ONLY, 3) is not None
    now[0] = 104.0
    cached = cache.get(REQUESTS_ONLY, 3)
    assert cached is not None and cached.retry_after_ms == 6_000 and cached.reason == "rate"
    now[0] = 110.0
    assert cache.get(REQUESTS_ONLY, 50) is None


def test_a_quota_refusal_is_cached_one_second_at_most() -> None:
    now = [100.0]
    cache = RefusalCache(clock=lambda: now[0])
    cache.remember(PLAN, 100.0, refusal("quota", 86_400_000), cost=1)
    cached = cache.get(PLAN, 1)
    assert cached is not None and cached.reason == "quota" and cached.quota_counts == [1000, 0]
    now[0] = 100.0 + QUOTA_REFUSAL_TTL - 0.001
    assert cache.get(PLAN, 1) is not None
    now[0] = 100.0 + QUOTA_REFUSAL_TTL
    assert cache.get(PLAN, 1) is None  # a grant on another replica is seen from here on
    cache.remember(PLAN, now[0], refusal("concurrency", 0), cost=1)
    assert cache.get(PLAN, 1) is None


def settle(admission: Admission, plan: AdmissionPlan, ticket: Ticket, settled: int) -> None:
    ticket.settled = settled
    admission.release(plan, ticket)
    admission.release(plan, ticket)  # a second release (the forwarder's, then the finally) sends nothing


def test_a_settlement_rides_the_release_once_with_the_cost_buckets_only() -> None:
    store = Recorder()
    store.answer = AdmitResult(True, None, 0, [0, 0, 5], [60_000] * 3, [0], now_ms=1_234.0,
                               quota_counts=[0, 0], quota_reset_ms=[5_000, 5_000],
                               shadow_refused=[SHADOW.key])
    admission = Admission(store, on_error="deny", metrics=Metrics())  # type: ignore[arg-type]
    ticket = asyncio.run(admission.admit(PLAN, Charge(5, 2)))
    settle(admission, PLAN, ticket, 2)
    assert len(store.releases) == 1
    slots, lease, settlement = store.releases[0]
    assert slots == (BROWSERS,) and lease == ticket.lease_id
    # the request-counting rate and quota are not re-priced; the shadow bucket that refused
    # holds nothing of this request
    assert settlement == Settlement((CREDITS,), (MONTHLY,), 5, 2, 1_234.0)


def test_an_unchanged_charge_sends_no_settlement() -> None:
    store = Recorder()
    admission = Admission(store, on_error="deny", metrics=Metrics())  # type: ignore[arg-type]
    ticket = asyncio.run(admission.admit(PLAN, Charge(5)))
    settle(admission, PLAN, ticket, 5)
    assert store.releases == [((BROWSERS,), ticket.lease_id, None)]


def test_without_slots_the_release_carries_the_settlement_alone() -> None:
    store = Recorder()
    store.answer = AdmitResult(True, None, 0, [0], [60_000], [], now_ms=9.0, quota_counts=[0], quota_reset_ms=[1])
    admission = Admission(store, on_error="deny", metrics=Metrics())  # type: ignore[arg-type]
    ticket = asyncio.run(admission.admit(NO_SLOTS, Charge(1)))
    assert ticket.store is None and ticket.counted_in is store
    settle(admission, NO_SLOTS, ticket, 9)
    assert store.releases == [((), ticket.lease_id, Settlement((CREDITS,), (MONTHLY,), 1, 9, 9.0))]
    untouched = asyncio.run(admission.admit(NO_SLOTS, Charge(1)))
    settle(admission, NO_SLOTS, untouched, 1)
    assert len(store.releases) == 1  # nothing held, nothing to settle: no store call


def test_a_refused_request_settles_nothing() -> None:
    store = Recorder()
    store.answer = refusal("rate", 1_000)
    admission = Admission(store, on_error="deny", metrics=Metrics())  # type: ignore[arg-type]
    ticket = asyncio.run(admission.admit(PLAN, Charge(5)))
    settle(admission, PLAN, ticket, 0)
    assert store.releases == []


def test_shadow_refusals_are_counted_by_plan_and_limit() -> None:
    store = Recorder()
    store.answer = AdmitResult(True, None, 0, [0, 0, 5], [60_000] * 3, [0], quota_counts=[0, 0],
                               quota_reset_ms=[1, 1], shadow_refused=[SHADOW.key])
    metrics = Metrics()
    admission = Admission(store, on_error="deny", metrics=metrics)  # type: ignore[arg-type]
    asyncio.run(admission.admit(PLAN, Charge(5)))
    asyncio.run(admission.admit(PLAN, Charge(5)))
    metrics.flush()
    assert metrics.shadow_refusals.labels("pro", "tight")._value.get() == 2


def test_the_local_fallback_divides_quotas_like_rates_and_settles_there() -> None:
    shared, local = Recorder(), Recorder()
    shared.fail = True
    admission = Admission(shared, on_error="local", metrics=Metrics(), local=local,  # type: ignore[arg-type]
                          local_divisor=4)
    ticket = asyncio.run(admission.admit(PLAN, Charge(10, 2)))
    call = local.admits[0]
    assert [q.limit for q in call["quotas"]] == [250, 12]
    assert [r.limit for r in call["rates"]] == [2, 25, 1]
    assert [q.key for q in call["quotas"]] == [MONTHLY.key, DAILY_REQUESTS.key]
    assert ticket.counted_in is local
    settle(admission, PLAN, ticket, 3)
    # the shadow bucket admitted this one (it holds its units): it is re-priced too
    assert local.releases[0][2] == Settlement((CREDITS, SHADOW), (MONTHLY,), 10, 3, 1_000.0)


def test_a_refusal_by_a_cost_counting_window_is_cached_one_second_at_most() -> None:
    # a settlement on another replica may refund units before they leave the window with time
    now = [100.0]
    cache = RefusalCache(clock=lambda: now[0])
    requests_only = REQUESTS_ONLY
    cache.remember(PLAN, 100.0, refusal("rate", 30_000), cost=5)
    cache.remember(requests_only, 100.0, refusal("rate", 30_000), cost=1)
    now[0] = 100.0 + QUOTA_REFUSAL_TTL
    assert cache.get(PLAN, 5) is None
    assert cache.get(requests_only, 1) is not None  # nothing refunds a request-counting window


def test_a_weighted_waiter_keeps_its_weight_through_rechecks() -> None:
    slots = SlotBucket("gw:{k:9}:c:browsers", 3)
    plan = AdmissionPlan("p", (), (), (slots,), (BucketInfo("browsers", 3, 0.0),), 2.0)

    async def scenario() -> None:
        store = MemoryStore(30.0)
        admission = Admission(store, on_error="deny", metrics=Metrics())
        first = await admission.admit(plan, Charge(1, 2))
        second = await admission.admit(plan, Charge(1, 2))  # 2 + 2 > 3: it waits
        assert first.admitted and second.waiting_in is store and not second.admitted
        again = await admission.recheck(plan, second)
        assert again.waiting_in is store  # still no room
        admission.release(plan, first)
        admitted = await admission.recheck(plan, again)
        assert admitted.admitted and admitted.charge == Charge(1, 2) and admitted.lease_id.endswith("*2")
        assert (await store.usage([], [slots])).slot_counts == [2]
        admission.release(plan, admitted)
        assert (await store.usage([], [slots])).slot_counts == [0]

    asyncio.run(scenario())


def test_a_waiter_counts_its_shadow_refusal_once() -> None:
    store = Recorder()
    plan = AdmissionPlan("pro", PLAN.rates, PLAN.rate_info, PLAN.slots, PLAN.slot_info, 2.0)
    queued = AdmitResult(False, "concurrency", 0, [0, 0, 5], [1] * 3, [4], queued=True, arrival="a",
                         shadow_refused=[SHADOW.key])
    store.answer = queued
    metrics = Metrics()
    admission = Admission(store, on_error="deny", metrics=metrics)  # type: ignore[arg-type]

    async def scenario() -> None:
        ticket = await admission.admit(plan)
        ticket = await admission.recheck(plan, ticket)
        store.answer = AdmitResult(True, None, 0, [0, 0, 5], [1] * 3, [3], shadow_refused=[SHADOW.key])
        ticket = await admission.recheck(plan, ticket)
        assert ticket.admitted

    asyncio.run(scenario())
    metrics.flush()
    assert metrics.shadow_refusals.labels("pro", "tight")._value.get() == 1
