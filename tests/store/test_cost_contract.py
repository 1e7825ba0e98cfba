"""Issue 18's part of the store contract, on every backend: cost-counting windows, period
quotas, weighted slots, shadow buckets, settlements riding the release, quota grants and
resets, and weighted job slots. Decisions here are exact numbers the two stores must agree on
(the Hypothesis model in test_model.py explores the same rules at random)."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from gateway.store.base import (
    Charge,
    QueueSpot,
    QuotaBucket,
    QuotaUsage,
    RateBucket,
    Settlement,
    SlotBucket,
    weighted_lease,
)
from gateway.store.jobs import ActiveJob, EndedJob, JobClaim
from gateway.store.redis_jobs import RedisJobStore
from tests.store.conftest import Backend, DrivenClock, counter, rate, slot

pytestmark = pytest.mark.anyio

DAY = 86_400_000


def at(*parts: int) -> int:
    """ms since the epoch of a UTC date-time."""
    return int(datetime.datetime(*parts, tzinfo=datetime.UTC).timestamp() * 1000)  # type: ignore[misc]


def units(name: str, limit: int, window_ms: int, *, exact: bool = True, shadow: bool = False) -> RateBucket:
    base = rate(name, limit, window_ms) if exact else counter(name, limit, window_ms)
    return RateBucket(base.key, limit, window_ms, exact=exact, counts_cost=True, shadow=shadow)


def quota(name: str, limit: int, period: str = "month", *, shadow: bool = False) -> QuotaBucket:
    return QuotaBucket(f"t:{{k1}}:q:{name}", limit, period, shadow=shadow)  # type: ignore[arg-type]


def jobs_of(backend: Backend, store: Any) -> Any:
    return RedisJobStore(store, prefix="t") if backend.is_redis else store


async def test_a_cost_counting_window_holds_units(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    credits, requests = units("credits", 10, 60_000), rate("requests", 100, 60_000)
    first = await store.admit([credits, requests], [], "a", charge=Charge(4))
    clock.advance_ms(1_000)
    second = await store.admit([credits, requests], [], "b", charge=Charge(5))
    assert (first.admitted, second.admitted, second.rate_counts) == (True, True, [4, 1])
    clock.advance_ms(1_000)
    # 9 units held: a cost of 2 waits for the first admission's 4 units to leave.
    refused = await store.admit([credits, requests], [], "c", charge=Charge(2))
    assert (refused.reason, refused.rate_counts, refused.retry_after_ms) == ("rate", [9, 2], 58_000)
    # A cost of 1 fits; a cost above the limit never does (one window).
    assert (await store.admit([credits], [], "d", charge=Charge(1))).admitted
    too_big = await store.admit([credits], [], "e", charge=Charge(11))
    assert (too_big.admitted, too_big.retry_after_ms) == (False, 60_000)
    # Cost 0 is free: admitted at a full window, writing nothing.
    free = await store.admit([credits], [], "f", charge=Charge(0))
    assert (free.admitted, free.rate_counts) == (True, [10])
    assert (await store.admit([credits], [], "g", charge=Charge(0))).rate_counts == [10]
    # After the first admission's units leave: room for 4, not 5.
    clock.advance_ms(58_000)
    assert not (await store.admit([credits], [], "h", charge=Charge(5))).admitted
    assert (await store.admit([credits], [], "i", charge=Charge(4))).admitted


async def test_a_cost_counting_counter_adds_the_cost(backend: Backend, clock: DrivenClock) -> None:
    clock.ms = 60_000 * 1000  # the start of a fixed window
    store = await backend.started(clock=clock)
    credits = units("credits", 10, 60_000, exact=False)
    assert (await store.admit([credits], [], "a", charge=Charge(7))).admitted
    refused = await store.admit([credits], [], "b", charge=Charge(4))
    assert (refused.admitted, refused.rate_counts) == (False, [7])
    # At mid-window next time the 7 weigh 3.5: estimate + 4 > 10 until 7 * (1 - f) <= 6.
    assert refused.retry_after_ms == 60_000 + 8_572  # ceil(60_000 / 7)
    assert (await store.admit([credits], [], "c", charge=Charge(3))).rate_counts == [7]
    assert not (await store.admit([credits], [], "d", charge=Charge(11))).admitted


async def test_a_quota_refuses_until_its_period_ends(backend: Backend, clock: DrivenClock) -> None:
    clock.ms = at(2024, 2, 28, 12)  # a leap year: February has 29 days
    store = await backend.started(clock=clock)
    credits = quota("credits", 10, "month")
    rpm = rate("rpm", 1, 60_000)
    first = await store.admit([], [], "a", quotas=[credits], charge=Charge(8))
    assert (first.admitted, first.quota_counts, first.quota_reset_ms) == (True, [0], [at(2024, 3, 1) - clock.ms])
    # Refused by the quota and the rate limit: "quota" wins, retry at the later of the two.
    assert (await store.admit([rpm], [], "b", quotas=[credits])).admitted
    refused = await store.admit([rpm], [], "c", quotas=[credits], charge=Charge(3))
    assert (refused.reason, refused.quota_counts, refused.retry_after_ms) == ("quota", [9], at(2024, 3, 1) - clock.ms)
    assert (await store.admit([], [], "d", quotas=[credits], charge=Charge(1))).admitted
    clock.ms = at(2024, 2, 29, 23, 59, 59) + 999
    assert not (await store.admit([], [], "e", quotas=[credits])).admitted
    clock.ms += 1  # March: a new period
    fresh = await store.admit([], [], "f", quotas=[credits], charge=Charge(10))
    assert (fresh.admitted, fresh.quota_counts, fresh.quota_reset_ms) == (True, [0], [31 * DAY])


async def test_daily_and_weekly_quotas_follow_utc_days_and_iso_weeks(backend: Backend, clock: DrivenClock) -> None:
    clock.ms = at(2026, 1, 4, 23, 0)  # a Sunday
    store = await backend.started(clock=clock)
    day, week = quota("day", 2, "1d"), quota("week", 3, "7d")
    result = await store.admit([], [], "a", quotas=[day, week], charge=Charge(2))
    assert result.quota_reset_ms == [3_600_000, 3_600_000]
    clock.ms = at(2026, 1, 5, 0, 30)  # Monday: both periods are new
    result = await store.admit([], [], "b", quotas=[day, week], charge=Charge(2))
    assert (result.admitted, result.quota_counts, result.quota_reset_ms) == (
        True, [0, 0], [DAY - 1_800_000, 7 * DAY - 1_800_000])
    clock.ms = at(2026, 1, 6, 0, 30)
    refused = await store.admit([], [], "c", quotas=[day, week], charge=Charge(2))
    assert (refused.reason, refused.quota_counts) == ("quota", [0, 2])
    assert refused.retry_after_ms == 6 * DAY - 1_800_000  # the week refuses: to its end


async def test_quota_grants_and_resets(backend: Backend, clock: DrivenClock) -> None:
    clock.ms = at(2026, 5, 20)
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    credits = quota("credits", 5)
    assert (await store.admit([], [], "a", quotas=[credits], charge=Charge(5))).admitted
    assert not (await store.admit([], [], "b", quotas=[credits])).admitted
    left = at(2026, 6, 1) - clock.ms
    assert await store.adjust_quota(credits, grant=3) == QuotaUsage(5, 3, left)
    assert (await store.admit([], [], "c", quotas=[credits], charge=Charge(3))).quota_counts == [5]
    assert not (await store.admit([], [], "d", quotas=[credits])).admitted
    assert (await jobs.usage([], [], [credits])).quotas == [QuotaUsage(8, 3, left)]
    assert await store.adjust_quota(credits, reset=True) == QuotaUsage(0, 0, left)
    assert (await store.admit([], [], "e", quotas=[credits], charge=Charge(5))).admitted
    # A grant is for the current period only.
    await store.adjust_quota(credits, grant=100)
    clock.ms = at(2026, 6, 1)
    assert (await jobs.usage([], [], [credits])).quotas == [QuotaUsage(0, 0, 30 * DAY)]
    with pytest.raises(ValueError):
        await store.adjust_quota(credits, grant=-1)


async def test_weighted_slots(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock, lease=10.0)
    browsers = [slot("browsers", 3)]
    heavy = weighted_lease("heavy", 2)
    assert (await store.admit([], browsers, heavy, charge=Charge(1, 2))).admitted
    refused = await store.admit([], browsers, weighted_lease("other", 2), charge=Charge(1, 2))
    assert (refused.reason, refused.slot_counts) == ("concurrency", [2])
    light = await store.admit([], browsers, "light")
    assert (light.admitted, light.slot_counts) == (True, [2])
    # The heartbeat keeps all of a weighted lease's slots.
    for _ in range(4):
        clock.advance_ms(4_000)
        assert await store.renew() == 0
    assert (await store.admit([], browsers, "probe")).slot_counts == [3]
    store.release(browsers, heavy)
    await store.flush()
    assert (await store.admit([], browsers, weighted_lease("next", 2), charge=Charge(1, 2))).slot_counts == [1]
    store.release(browsers, "light")
    store.release(browsers, weighted_lease("next", 2))


async def test_a_weighted_waiter_holds_its_weight_in_the_queue(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    browsers = [slot("browsers", 3)]
    assert (await store.admit([], browsers, "holder-1")).admitted
    assert (await store.admit([], browsers, "holder-2")).admitted
    big = weighted_lease("big", 2)
    waiting = await store.admit([], browsers, big, QueueSpot(big, 5_000), charge=Charge(1, 2))
    assert (waiting.queued, waiting.slot_counts) == (True, [2])
    # A newcomer counts the waiter's two queued slots ahead of it.
    newcomer = await store.admit([], browsers, "small", QueueSpot("small", 5_000))
    assert (newcomer.queued, newcomer.slot_counts) == (True, [4])
    store.release(browsers, "holder-1")
    await store.flush()
    served = await store.admit([], browsers, big, QueueSpot(big, 5_000, waiting.arrival), charge=Charge(1, 2))
    assert (served.admitted, served.slot_counts) == (True, [1])
    # The small waiter now has nobody ahead: it fits once a slot frees.
    again = await store.admit([], browsers, "small", QueueSpot("small", 5_000, newcomer.arrival))
    assert (again.queued, again.slot_counts) == (True, [3])
    store.leave_queue(browsers, "small")
    store.release(browsers, "holder-2")
    store.release(browsers, big)


async def test_shadow_buckets_never_refuse_and_take_nothing_when_they_would(
    backend: Backend, clock: DrivenClock
) -> None:
    clock.ms = at(2026, 7, 1)
    store = await backend.started(clock=clock)
    tight = units("tight", 5, 60_000, shadow=True)
    enforced = units("enforced", 100, 60_000)
    daily = quota("daily", 4, "1d", shadow=True)
    browsers = SlotBucket(slot("browsers", 1).key, 1, shadow=True)
    first = await store.admit([tight, enforced], [browsers], "a", quotas=[daily], charge=Charge(4))
    assert (first.admitted, first.shadow_refused) == (True, [])
    second = await store.admit([tight, enforced], [browsers], "b", quotas=[daily], charge=Charge(3))
    assert second.admitted
    assert second.shadow_refused == [tight.key, daily.key, browsers.key]
    # Only the enforced bucket took b's units; the shadow ones still hold a's alone.
    third = await store.admit([tight, enforced], [browsers], "c", quotas=[daily], charge=Charge(1))
    assert (third.admitted, third.rate_counts, third.quota_counts, third.slot_counts) == (True, [4, 7], [4], [1])
    assert third.shadow_refused == [daily.key, browsers.key]
    assert (await store.admit([tight], [], "d", charge=Charge(0))).shadow_refused == []
    store.release([browsers], "a")
    store.release([browsers], "b")
    store.release([browsers], "c")


async def test_a_settlement_rides_the_release_and_applies_once(backend: Backend, clock: DrivenClock) -> None:
    clock.ms = at(2026, 3, 10)
    store = await backend.started(clock=clock)
    credits, requests = units("credits", 20, 60_000), rate("requests", 100, 60_000)
    monthly = quota("monthly", 50)
    browsers = [slot("browsers", 1)]
    lease = weighted_lease("job", 1)
    admitted = await store.admit([credits, requests], browsers, lease, quotas=[monthly], charge=Charge(5))
    refund = Settlement((credits,), (monthly,), 5, 2, admitted.now_ms)
    for _ in range(2):  # sent again (a lost connection): applied once
        store.release(browsers, lease, settlement=refund)
        await store.flush()
    after = await store.admit([credits, requests], browsers, "next", quotas=[monthly], charge=Charge(1))
    assert (after.admitted, after.rate_counts, after.quota_counts, after.slot_counts) == (True, [2, 1], [2], [0])
    # An extra debit (no slots to free: the settlement alone), over the limit: later requests wait.
    clock.advance_ms(1_000)
    debit = Settlement((credits,), (monthly,), 1, 19, after.now_ms)
    store.release([], "next", settlement=debit)
    store.release(browsers, "next")
    await store.flush()
    store.release([], "next", settlement=debit)
    await store.flush()
    over = await store.admit([credits], [], "over", quotas=[monthly], charge=Charge(1))
    assert (over.reason, over.rate_counts, over.quota_counts) == ("rate", [21], [21])
    # The debit sits at the admission's time: it leaves with the admission.
    assert over.retry_after_ms == 59_000
    clock.advance_ms(59_000)
    assert (await store.admit([credits], [], "later", charge=Charge(1))).rate_counts == [0]


async def test_settling_a_counter_and_an_aged_out_log(backend: Backend, clock: DrivenClock) -> None:
    clock.ms = 60_000 * 2000
    store = await backend.started(clock=clock)
    credits = units("credits", 10, 60_000, exact=False)
    log = units("log", 10, 60_000)
    first = await store.admit([credits, log], [], "a", charge=Charge(6))
    store.release([], "a", settlement=Settlement((credits, log), (), 6, 1, first.now_ms))
    await store.flush()
    second = await store.admit([credits, log], [], "b", charge=Charge(9))
    assert second.rate_counts == [1, 1]
    # In the next fixed window b's 9 are the previous count; its refund lowers that.
    clock.advance_ms(60_000)
    store.release([], "b", settlement=Settlement((credits, log), (), 9, 3, second.now_ms))
    await store.flush()
    late = await store.admit([credits, log], [], "c", charge=Charge(0))
    assert late.rate_counts == [4, 0]  # the counter's previous is 1 + 3 at full weight; the log aged out


async def test_a_weighted_lease_hands_its_slots_to_a_job(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 3)]
    lease = weighted_lease("req", 2)
    assert (await store.admit([], crawls, lease, charge=Charge(1, 2))).admitted
    assert await jobs.hand_over(crawls, lease, JobClaim("job*7", "k1", 3600.0))
    store.release(crawls, lease)
    await store.flush()
    usage = await jobs.usage([], crawls)
    assert (usage.slot_counts, [[job.job_id for job in held] for held in usage.jobs]) == ([2], [["job*7"]])
    assert all(isinstance(job, ActiveJob) for job in usage.jobs[0])
    assert (await store.admit([], crawls, "probe")).slot_counts == [2]
    store.release(crawls, "probe")
    assert await jobs.end("job*7", "k1") == EndedJob("job*7", "k1")
    await store.flush()
    assert (await store.admit([], crawls, "after")).slot_counts == [0]
    store.release(crawls, "after")


async def test_charges_and_settlements_are_bounded(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    credits = units("credits", 5_000, 60_000)
    for bad in (Charge(-1), Charge(1001), Charge(1, 0), Charge(1, 65)):
        with pytest.raises(ValueError):
            await store.admit([credits], [], "bad", charge=bad)
    admitted = await store.admit([credits], [], "a", charge=Charge(1))
    # A settlement above MAX_COST is held to it; one below 0 to 0 (a release never raises).
    store.release([], "a", settlement=Settlement((credits,), (), 1, 10**9, admitted.now_ms))
    store.release([], "b", settlement=Settlement((credits,), (), 5, -3, admitted.now_ms))
    await store.flush()
    assert (await store.admit([credits], [], "c", charge=Charge(0))).rate_counts == [1000]


async def test_a_slot_freed_by_a_settling_release_is_free_for_the_next_admission(
    backend: Backend, clock: DrivenClock
) -> None:
    """As for a plain release: an admission issued after it (same loop iteration) finds it applied."""
    store = await backend.started(clock=clock)
    credits, browsers = units("credits", 1_000, 60_000), [slot("browsers", 1)]
    for n in range(30):
        admitted = await store.admit([credits], browsers, f"a{n}", charge=Charge(3))
        assert admitted.admitted, n
        store.release(browsers, f"a{n}", settlement=Settlement((credits,), (), 3, 1, admitted.now_ms))
        # No await in between: the next admission is queued right behind the release.
        assert (await store.admit([credits], browsers, f"b{n}", charge=Charge(0))).admitted, n
        store.release(browsers, f"b{n}")


async def test_concurrent_costly_weighted_admissions_stay_within_every_limit(
    backend: Backend, clock: DrivenClock
) -> None:
    """300 admissions in one tick, costs 0..7 and weights 1..3: the units and slots admitted
    never exceed a limit, and the store holds exactly what the callers were told."""
    clock.ms = at(2026, 8, 14)
    store = await backend.started(clock=clock, max_connections=4, timeout=5.0)
    credits, monthly = units("credits", 120, 60_000), quota("monthly", 90)
    browsers = [slot("browsers", 100)]
    charges = [Charge(n % 8, 1 + n % 3) for n in range(300)]
    leases = [weighted_lease(f"c{n}", charge.slots) for n, charge in enumerate(charges)]
    results = await asyncio.gather(*(
        store.admit([credits], browsers, lease, quotas=[monthly], charge=charge)
        for lease, charge in zip(leases, charges, strict=True)))
    admitted = [charge for charge, result in zip(charges, results, strict=True) if result.admitted]
    used = sum(charge.cost for charge in admitted)
    assert 0 < used <= 90 and sum(charge.slots for charge in admitted) <= 100
    assert any(result.reason == "quota" for result in results)
    probe = await store.admit([credits], [], "probe", quotas=[monthly], charge=Charge(0))
    assert (probe.rate_counts, probe.quota_counts) == ([used], [used])
    held = await store.admit([], browsers, "probe-slot")
    assert held.slot_counts == [sum(charge.slots for charge in admitted)]
    store.release(browsers, "probe-slot")
    for lease, result in zip(leases, results, strict=True):
        if result.admitted:
            store.release(browsers, lease)
