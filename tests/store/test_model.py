"""Model-based test: random sequences of admit / release / advance time / heartbeat against
a plain-Python model of sliding windows and leased slots. Every decision must equal the
model's, field by field, and the invariants (held <= limit, admissions per window <= N)
must hold after every step.

Runs on the memory store and on fakeredis every time (driven clock); on a real Redis with
the driven time passed as ARGV (marked redis)."""

from __future__ import annotations

import asyncio
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

from gateway.store.base import AdmitResult, RateBucket, SlotBucket
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.store.conftest import DrivenClock

T = TypeVar("T")

# Long enough that Redis key TTLs (real time) never run out during an example, while the
# driven clock jumps through many windows.
LEASE_MS = 30_000
RATE_WINDOWS = {"r1": 10_000, "r2": 25_000}
RATE_LIMITS = {"r1": 2, "r2": 3}  # the configured N; a call may carry N-1 (a reload lowered it)
SLOT_LIMITS = {"s1": 1, "s2": 2}


class Model:
    """Exact semantics in whole milliseconds."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.log: dict[str, list[int]] = {key: [] for key in RATE_WINDOWS}  # every admission, kept
        self.slots: dict[str, dict[str, int]] = {key: {} for key in SLOT_LIMITS}  # lease -> expiry
        self.held: set[tuple[str, str]] = set()

    def in_window(self, key: str) -> list[int]:
        horizon = self.now - RATE_WINDOWS[key]
        return sorted(t for t in self.log[key] if t > horizon)

    def admit(self, rates: list[tuple[str, int]], slots: list[tuple[str, int]], lease_id: str) -> AdmitResult:
        status, retry_after, reclaimed = 0, 0, 0
        counts, resets, slot_counts = [], [], []
        for key, limit in rates:
            window = RATE_WINDOWS[key]
            times = self.in_window(key)
            counts.append(len(times))
            resets.append(times[0] + window - self.now if times else window)
            if len(times) >= limit:
                status = 1
                retry_after = max(retry_after, times[len(times) - limit] + window - self.now)
        for key, limit in slots:
            leases = self.slots[key]
            expired = [lease for lease, expiry in leases.items() if expiry <= self.now]
            for lease in expired:
                del leases[lease]
            reclaimed += len(expired)
            slot_counts.append(len(leases))
            if len(leases) >= limit and status == 0:
                status = 2
        if status == 0:
            for key, _ in rates:
                self.log[key].append(self.now)
            for key, _ in slots:
                self.slots[key][lease_id] = self.now + LEASE_MS
                self.held.add((key, lease_id))
        return AdmitResult(
            admitted=status == 0,
            reason=[None, "rate", "concurrency"][status],
            retry_after_ms=retry_after,
            rate_counts=counts,
            rate_reset_ms=resets,
            slot_counts=slot_counts,
            reclaimed=reclaimed,
        )

    def release(self, keys: list[str], lease_id: str) -> None:
        for key in keys:
            self.slots[key].pop(lease_id, None)
            self.held.discard((key, lease_id))

    def renew(self) -> int:
        lost = 0
        for key, lease_id in sorted(self.held):
            expiry = self.slots[key].get(lease_id)
            if expiry is None or expiry <= self.now:
                self.held.discard((key, lease_id))
                lost += 1
            else:
                self.slots[key][lease_id] = self.now + LEASE_MS
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
            self.leases: dict[str, list[str]] = {}  # admitted, not yet released -> slot names
            self.counter = 0

        def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
            return self.loop.run_until_complete(coroutine)

        def key(self, kind: str, name: str) -> str:
            return f"t:{{{self.tag}}}:{kind}:{name}"

        @rule(
            rate_names=st.lists(st.sampled_from(sorted(RATE_WINDOWS)), unique=True, max_size=2),
            slot_names=st.lists(st.sampled_from(sorted(SLOT_LIMITS)), unique=True, max_size=2),
            lowered=st.booleans(),
        )
        def admit(self, rate_names: list[str], slot_names: list[str], lowered: bool) -> None:
            if not rate_names and not slot_names:
                return
            self.counter += 1
            lease_id = f"lease-{self.counter}"
            rates = [(name, RATE_LIMITS[name] - (1 if lowered else 0)) for name in rate_names]
            slots = [(name, SLOT_LIMITS[name]) for name in slot_names]
            expected = self.model.admit(rates, slots, lease_id)
            actual = self.run(
                self.store.admit(
                    [RateBucket(self.key("r", name), limit, RATE_WINDOWS[name]) for name, limit in rates],
                    [SlotBucket(self.key("s", name), limit) for name, limit in slots],
                    lease_id,
                )
            )
            assert actual == expected
            event(f"admit: {actual.reason or 'admitted'}{', reclaimed' if actual.reclaimed else ''}")
            if actual.admitted and slot_names:
                self.leases[lease_id] = slot_names

        @precondition(lambda self: bool(self.leases))
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            lease_id = data.draw(st.sampled_from(sorted(self.leases)))
            names = self.leases.pop(lease_id)
            self.model.release(names, lease_id)
            self.run(self.release_and_flush(names, lease_id))

        async def release_and_flush(self, names: list[str], lease_id: str) -> None:
            # Inside the loop, as in the gateway: the Redis store flushes from a task.
            self.store.release(
                [SlotBucket(self.key("s", name), SLOT_LIMITS[name]) for name in names], lease_id
            )
            await self.store.flush()

        @rule(ms=st.integers(min_value=1, max_value=45_000))
        def advance(self, ms: int) -> None:
            self.clock.advance_ms(ms)
            self.model.now = self.clock.ms

        @precondition(lambda self: bool(self.model.held))
        @rule()
        def heartbeat(self) -> None:
            lost = self.run(self.store.renew())
            assert lost == self.model.renew()
            event(f"heartbeat: {'lost' if lost else 'all renewed'}")

        @invariant()
        def never_over_the_limits(self) -> None:
            for name, limit in SLOT_LIMITS.items():
                alive = [e for e in self.model.slots[name].values() if e > self.model.now]
                assert len(alive) <= limit
            for name, limit in RATE_LIMITS.items():
                # Every window that ended at an admission instant holds at most N admissions.
                log = sorted(self.model.log[name])
                window = RATE_WINDOWS[name]
                for end in log:
                    assert sum(1 for t in log if end - window < t <= end) <= limit

        def teardown(self) -> None:
            try:
                for lease_id, names in self.leases.items():
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
