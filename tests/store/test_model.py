"""Model-based test: random sequences of admit / release (with or without a settlement, sent
twice) / quota adjustment / advance time (within windows, and across days, weeks and months) /
heartbeat against a plain-Python model of cost-counting sliding windows, period quotas (periods
by `datetime`), weighted leased slots and shadow buckets. Every decision must equal the model's,
field by field, and the invariant (live slots <= limit) must hold after every step.

Runs on the memory store and on fakeredis every time (driven clock); on a real Redis with
the driven time passed as ARGV (marked redis)."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import fakeredis
import pytest
import redis.asyncio as aredis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.store.base import (
    AdmitResult,
    Charge,
    QuotaBucket,
    QuotaUsage,
    RateBucket,
    Settlement,
    SlotBucket,
    weighted_lease,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.store.conftest import DrivenClock

T = TypeVar("T")

# Long enough that Redis key TTLs (real time) never run out during an example, while the
# driven clock jumps through many windows.
LEASE_MS = 30_000
DAY_MS = 86_400_000
# name -> (N, window_ms, counts cost, shadow); a call may carry N-1 (a reload lowered it).
RATES = {"r1": (3, 10_000, False, False), "r2": (8, 25_000, True, False), "rs": (5, 10_000, True, True)}
# name -> (N, period, shadow)
QUOTAS = {"q1": (12, "1d", False), "q2": (30, "month", False), "qs": (9, "7d", True)}
SLOTS = {"s1": (2, False), "s2": (3, False), "ss": (2, True)}  # name -> (N, shadow)


def period_start(now_ms: int, period: str) -> datetime.datetime:
    """The period holding `now_ms`, by `datetime` (independent of gateway/store/periods.py)."""
    at = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "1d":
        return day
    if period == "7d":
        return day - datetime.timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end_ms(now_ms: int, period: str) -> int:
    start = period_start(now_ms, period)
    if period == "1d":
        end = start + datetime.timedelta(days=1)
    elif period == "7d":
        end = start + datetime.timedelta(days=7)
    else:
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    return int(end.timestamp() * 1000)


def members_of(lease_id: str) -> list[str]:
    """A weighted lease's members, spelled out here rather than imported."""
    base, _, k = lease_id.rpartition("*")
    return [lease_id] + [f"{lease_id}#{n}" for n in range(2, int(k) + 1)] if base else [lease_id]


class Model:
    """Exact semantics in whole milliseconds."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.log: dict[str, list[tuple[int, str]]] = {key: [] for key in RATES}  # (time, lease) per unit
        # quota -> (period start, used, granted)
        self.quotas: dict[str, tuple[datetime.datetime, int, int]] = {}
        self.slots: dict[str, dict[str, int]] = {key: {} for key in SLOTS}  # member -> expiry
        self.held: set[tuple[str, str]] = set()
        self.settled: set[str] = set()

    def in_window(self, key: str) -> list[int]:
        horizon = self.now - RATES[key][1]
        return sorted(t for t, _ in self.log[key] if t > horizon)

    def quota_now(self, key: str) -> tuple[int, int]:
        start = period_start(self.now, QUOTAS[key][1])
        held = self.quotas.get(key)
        return (held[1], held[2]) if held is not None and held[0] == start else (0, 0)

    def admit(
        self, rates: list[tuple[str, int]], quotas: list[str], slots: list[str], lease_id: str, cost: int
    ) -> tuple[AdmitResult, set[str]]:
        """The decision, and the names of the buckets it took (all but shadow refusals)."""
        status, retry_after, reclaimed = 0, 0, 0
        counts, resets, slot_counts, quota_counts, quota_resets, quota_granted = [], [], [], [], [], []
        shadow: list[str] = []
        members = members_of(lease_id)
        for key, limit in rates:
            _, window, counts_cost, is_shadow = RATES[key]
            units = cost if counts_cost else 1
            times = self.in_window(key)
            counts.append(len(times))
            resets.append(times[0] + window - self.now if times else window)
            if len(times) + units > limit:
                wait = window if units > limit else times[len(times) + units - limit - 1] + window - self.now
                if is_shadow:
                    shadow.append(key)
                else:
                    status = 1
                    retry_after = max(retry_after, wait)
        for key in quotas:
            limit, period, is_shadow = QUOTAS[key]
            used, granted = self.quota_now(key)
            quota_counts.append(used)
            quota_resets.append(period_end_ms(self.now, period) - self.now)
            quota_granted.append(granted)
            if used + cost > limit + granted:
                if is_shadow:
                    shadow.append(key)
                else:
                    status = 4
                    retry_after = max(retry_after, quota_resets[-1])
        for key in slots:
            limit, is_shadow = SLOTS[key]
            leases = self.slots[key]
            expired = [member for member, expiry in leases.items() if expiry <= self.now]
            for member in expired:
                del leases[member]
            reclaimed += len(expired)
            slot_counts.append(len(leases))
            if len(leases) + len(members) > limit:
                if is_shadow:
                    shadow.append(key)
                elif status == 0:
                    status = 2
        written: set[str] = set()
        if status == 0:
            for key, _ in rates:
                units = cost if RATES[key][2] else 1
                if key not in shadow:
                    self.log[key] += [(self.now, lease_id)] * units
                    written.add(key)  # (a settlement re-prices it, even from 0 units)
            for key in quotas:
                if key not in shadow:
                    if cost:
                        used, granted = self.quota_now(key)
                        self.quotas[key] = (period_start(self.now, QUOTAS[key][1]), used + cost, granted)
                    written.add(key)
            for key in slots:
                if key not in shadow:
                    for member in members:
                        self.slots[key][member] = self.now + LEASE_MS
                    self.held.add((key, lease_id))
        result = AdmitResult(
            status == 0, {0: None, 1: "rate", 2: "concurrency", 4: "quota"}[status], retry_after,
            counts, resets, slot_counts, reclaimed, False, "", quota_counts, quota_resets, quota_granted,
            [f"KEY:{key}" for key in shadow], float(self.now),
        )
        return result, written

    def release(self, keys: list[str], lease_id: str) -> None:
        for key in keys:
            for member in members_of(lease_id):
                self.slots[key].pop(member, None)
            self.held.discard((key, lease_id))

    def settle(self, rates: list[str], quotas: list[str], lease_id: str, charged: int, settled: int,
               admitted_at: int) -> None:
        if settled == charged or lease_id in self.settled or not (rates or quotas):
            return
        self.settled.add(lease_id)
        for key in rates:
            horizon = self.now - RATES[key][1]
            if admitted_at <= horizon:
                continue  # aged out (or never written, when it was charged nothing)
            mine = [entry for entry in self.log[key] if entry[1] == lease_id]
            if charged > 0 and not mine:
                continue
            others = [entry for entry in self.log[key] if entry[1] != lease_id]
            self.log[key] = others + [(admitted_at, lease_id)] * settled
        for key in quotas:
            held = self.quotas.get(key)
            if held is not None and held[0] == period_start(admitted_at, QUOTAS[key][1]):
                self.quotas[key] = (held[0], max(0, held[1] + settled - charged), held[2])

    def adjust(self, key: str, grant: int, reset: bool) -> QuotaUsage:
        used, granted = (0, 0) if reset else self.quota_now(key)
        granted += grant
        self.quotas[key] = (period_start(self.now, QUOTAS[key][1]), used, granted)
        return QuotaUsage(used, granted, period_end_ms(self.now, QUOTAS[key][1]) - self.now)

    def renew(self) -> int:
        lost = 0
        for key, lease_id in sorted(self.held):
            expiry = self.slots[key].get(lease_id)
            if expiry is None or expiry <= self.now:
                self.held.discard((key, lease_id))
                lost += 1
            else:
                for member in members_of(lease_id):
                    self.slots[key][member] = self.now + LEASE_MS
        return lost


StoreFactory = Callable[[DrivenClock, str], tuple[Any, Callable[[], Coroutine[Any, Any, None]]]]


def memory_factory(clock: DrivenClock, tag: str) -> tuple[Any, Callable[[], Coroutine[Any, Any, None]]]:
    store = MemoryStore(LEASE_MS / 1000, clock=clock)
    return store, store.aclose


def fakeredis_factory(clock: DrivenClock, tag: str) -> tuple[Any, Callable[[], Coroutine[Any, Any, None]]]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    store = RedisStore.from_client(client, prefix="t", timeout=2.0, lease=LEASE_MS / 1000, clock=clock)
    return store, store.aclose


def real_redis_factory(url: str) -> StoreFactory:
    def factory(clock: DrivenClock, tag: str) -> tuple[Any, Callable[[], Coroutine[Any, Any, None]]]:
        store = RedisStore.from_client(
            aredis.Redis.from_url(url), prefix="t", timeout=2.0, lease=LEASE_MS / 1000, clock=clock
        )
        return store, store.aclose

    return factory


def machine_for(factory: StoreFactory) -> type[RuleBasedStateMachine]:
    class StoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.clock = DrivenClock()
            self.tag = uuid.uuid4().hex[:12]  # examples never share keys (real Redis)
            self.store, self.close = factory(self.clock, self.tag)
            self.model = Model(self.clock.ms)
            # admitted, not yet released -> (slot names, names written, cost, admitted at)
            self.leases: dict[str, tuple[list[str], list[str], int, int]] = {}
            self.counter = 0

        def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coroutine)

        def key(self, kind: str, name: str) -> str:
            return f"t:{{{self.tag}}}:{kind}:{name}"

        def bucket(self, name: str, lowered: bool = False) -> Any:
            if name in RATES:
                limit, window, counts_cost, shadow = RATES[name]
                return RateBucket(self.key("r", name), limit - (1 if lowered else 0), window,
                                  counts_cost=counts_cost, shadow=shadow)
            if name in QUOTAS:
                limit, period, shadow = QUOTAS[name]
                return QuotaBucket(self.key("q", name), limit, period, shadow=shadow)  # type: ignore[arg-type]
            return SlotBucket(self.key("s", name), SLOTS[name][0], shadow=SLOTS[name][1])

        @rule(
            rate_names=st.lists(st.sampled_from(sorted(RATES)), unique=True, max_size=3),
            quota_names=st.lists(st.sampled_from(sorted(QUOTAS)), unique=True, max_size=2),
            slot_names=st.lists(st.sampled_from(sorted(SLOTS)), unique=True, max_size=2),
            lowered=st.booleans(),
            cost=st.integers(min_value=0, max_value=6),
            weight=st.integers(min_value=1, max_value=3),
        )
        def admit(self, rate_names: list[str], quota_names: list[str], slot_names: list[str], lowered: bool,
                  cost: int, weight: int) -> None:
            if not rate_names and not slot_names and not quota_names:
                return
            self.counter += 1
            lease_id = weighted_lease(f"lease-{self.counter}", weight)
            rates = [(name, RATES[name][0] - (1 if lowered else 0)) for name in rate_names]
            expected, written = self.model.admit(rates, quota_names, slot_names, lease_id, cost)
            actual = self.run(
                self.store.admit(
                    [self.bucket(name, lowered) for name in rate_names],
                    [self.bucket(name) for name in slot_names],
                    lease_id,
                    quotas=[self.bucket(name) for name in quota_names],
                    charge=Charge(cost, weight),
                )
            )
            expected.shadow_refused = [self.bucket(key[4:]).key for key in expected.shadow_refused]
            assert actual == expected
            event(f"admit: {actual.reason or 'admitted'}{', reclaimed' if actual.reclaimed else ''}"
                  f"{', shadow refused' if actual.shadow_refused else ''}")
            if actual.admitted:
                self.leases[lease_id] = (slot_names, sorted(written), cost, self.model.now)

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data(), settle=st.booleans(), settled=st.integers(min_value=0, max_value=8))
        def release(self, data: st.DataObject, settle: bool, settled: int) -> None:
            lease_id = data.draw(st.sampled_from(sorted(self.leases)))
            names, written, charged, at = self.leases.pop(lease_id)
            self.model.release(names, lease_id)
            settlement = None
            if settle:
                rates = [name for name in written if name in RATES and RATES[name][2]]
                quotas = [name for name in written if name in QUOTAS]
                self.model.settle(rates, quotas, lease_id, charged, settled, at)
                settlement = Settlement(tuple(self.bucket(name) for name in rates),
                                        tuple(self.bucket(name) for name in quotas), charged, settled, float(at))
                event("release: settled " + ("down" if settled < charged else "up" if settled > charged else "same"))
            self.run(self.release_and_flush(names, lease_id, settlement))
            if settlement is not None:
                # Sent again (a release re-sent after a lost connection): it applies once.
                self.run(self.release_and_flush(names, lease_id, settlement))

        async def release_and_flush(self, names: list[str], lease_id: str,
                                    settlement: Settlement | None = None) -> None:
            # Inside the loop, as in the gateway: the Redis store flushes from a task.
            self.store.release([self.bucket(name) for name in names], lease_id, settlement=settlement)
            await self.store.flush()

        @rule(name=st.sampled_from(sorted(QUOTAS)), grant=st.integers(min_value=0, max_value=5),
              reset=st.booleans())
        def adjust_quota(self, name: str, grant: int, reset: bool) -> None:
            actual = self.run(self.store.adjust_quota(self.bucket(name), grant=grant, reset=reset))
            assert actual == self.model.adjust(name, grant, reset)

        @rule(ms=st.integers(min_value=1, max_value=45_000))
        def advance(self, ms: int) -> None:
            self.clock.advance_ms(ms)
            self.model.now = self.clock.ms

        @rule(days=st.integers(min_value=1, max_value=40), ms=st.integers(min_value=0, max_value=DAY_MS))
        def advance_days(self, days: int, ms: int) -> None:
            self.advance(days * DAY_MS + ms)

        @precondition(lambda self: bool(self.model.held))
        @rule()
        def heartbeat(self) -> None:
            lost = self.run(self.store.renew())
            assert lost == self.model.renew()
            event(f"heartbeat: {'lost' if lost else 'all renewed'}")

        @invariant()
        def never_over_the_slot_limits(self) -> None:
            for name, (limit, shadow) in SLOTS.items():
                if not shadow:
                    alive = [e for e in self.model.slots[name].values() if e > self.model.now]
                    assert len(alive) <= limit

        def teardown(self) -> None:
            try:
                for lease_id, (names, *_) in self.leases.items():
                    self.run(self.release_and_flush(names, lease_id))
                self.run(self.close())
            finally:
                self.loop.close()

    return StoreMachine


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_memory_store_matches_the_model() -> None:
    run_state_machine_as_test(machine_for(memory_factory), settings=SETTINGS)


def test_fakeredis_store_matches_the_model() -> None:
    run_state_machine_as_test(machine_for(fakeredis_factory), settings=SETTINGS)


@pytest.mark.redis
def test_real_redis_store_matches_the_model(redis_url: str) -> None:
    run_state_machine_as_test(
        machine_for(real_redis_factory(redis_url)),
        settings=settings(SETTINGS, max_examples=30),
    )
