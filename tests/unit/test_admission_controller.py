from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.admission.breaker import CircuitBreaker
from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission, StoreUnavailable
from gateway.metrics import Metrics
from gateway.store.base import AdmitResult, RateBucket, SlotBucket, StoreError, StoreRejected, rejected_for_its_keys
from gateway.store.memory import MemoryStore

PLAN = AdmissionPlan(
    "p",
    rates=(RateBucket("gw:{k:1}:r:rpm", 2, 60_000),),
    rate_info=(BucketInfo("rpm", 2, 60.0),),
    slots=(SlotBucket("gw:{k:1}:c:requests", 1),),
    slot_info=(BucketInfo("requests", 1, 0.0),),
    wait=0.0,
)


class BrokenStore:
    """A store that is down: every call fails."""

    def __init__(self) -> None:
        self.calls = 0
        self.released: list[str] = []

    async def start(self) -> None:
        raise StoreError("down")

    async def aclose(self) -> None:
        pass

    async def admit(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str, **_: object) -> AdmitResult:
        self.calls += 1
        raise StoreError("down")

    def release(self, slots: Sequence[SlotBucket], lease_id: str, **_: object) -> None:
        self.released.append(lease_id)

    async def check_ready(self) -> None:
        raise StoreError("down")


def fallbacks(metrics: Metrics, mode: str) -> float:
    return metrics.fallback_decisions.labels(mode)._value.get()


def test_deny_refuses_with_retry_after_and_counts() -> None:
    metrics = Metrics()
    admission = Admission(BrokenStore(), on_error="deny", metrics=metrics)
    with pytest.raises(StoreUnavailable) as refused:
        asyncio.run(admission.admit(PLAN))
    assert refused.value.retry_after >= 1
    assert fallbacks(metrics, "deny") == 1


def test_allow_admits_blind() -> None:
    metrics = Metrics()
    admission = Admission(BrokenStore(), on_error="allow", metrics=metrics)
    ticket = asyncio.run(admission.admit(PLAN))
    assert ticket.admitted and ticket.result is None and ticket.store is None
    assert fallbacks(metrics, "allow") == 1


def test_local_enforces_the_same_buckets_in_process() -> None:
    metrics = Metrics()
    store = BrokenStore()
    local = MemoryStore(30.0)
    admission = Admission(store, on_error="local", metrics=metrics, local=local)

    async def scenario() -> list[bool]:
        first = await admission.admit(PLAN)
        second = await admission.admit(PLAN)  # the only slot is held
        admission.release(PLAN, first)
        third = await admission.admit(PLAN)
        fourth = await admission.admit(PLAN)  # rate: 2 per minute already used
        assert third.store is local and store.released == []  # released where it was taken
        return [first.admitted, second.admitted, third.admitted, fourth.admitted]

    assert asyncio.run(scenario()) == [True, False, True, False]
    assert fallbacks(metrics, "local") == 4


def test_breaker_stops_calling_a_dead_store() -> None:
    clock = [0.0]
    store = BrokenStore()
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, clock=lambda: clock[0])
    admission = Admission(store, on_error="allow", metrics=Metrics(), breaker=breaker)

    async def many(n: int) -> None:
        for _ in range(n):
            await admission.admit(PLAN)

    asyncio.run(many(10))
    assert store.calls == 3  # then the breaker opened: no more timeouts paid
    clock[0] = 1.5
    asyncio.run(many(5))
    assert store.calls == 4  # one probe after the cooldown


class OneBadKeyStore(BrokenStore):
    """A store that answers, but rejects every call on one plan's keys (a key of another type
    under the prefix): `StoreRejected`, as the Redis store raises it."""

    def __init__(self) -> None:
        super().__init__()
        self.good = MemoryStore(30.0)

    async def admit(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str, **kw: object) -> AdmitResult:
        self.calls += 1
        if rates and rates[0].key == PLAN.rates[0].key:
            raise StoreRejected("WRONGTYPE Operation against a key holding the wrong kind of value script: 1, on @user_script:9.")
        return await self.good.admit(rates, slots, lease_id, **kw)  # type: ignore[arg-type]


OTHER = AdmissionPlan("p", rates=(RateBucket("gw:{k:2}:r:rpm", 100, 60_000),), rate_info=(BucketInfo("rpm", 100, 60.0),),
                      slots=(), slot_info=(), wait=0.0)


@pytest.mark.parametrize("on_error", ["deny", "local", "allow"])
def test_a_rejected_call_is_decided_by_on_error_alone_and_never_opens_the_breaker(on_error: str) -> None:
    metrics = Metrics()
    store = OneBadKeyStore()
    admission = Admission(store, on_error=on_error, metrics=metrics, local=MemoryStore(30.0))  # type: ignore[arg-type]

    async def scenario() -> None:
        for _ in range(10):  # the breaker's threshold is 3 consecutive failures
            if on_error == "deny":
                with pytest.raises(StoreUnavailable):
                    await admission.admit(PLAN)
            else:
                await admission.admit(PLAN)
        ticket = await admission.admit(OTHER)
        assert ticket.admitted and ticket.counted_in is store  # decided by the store itself
        assert admission.bridge is None or not admission.bridge.degraded  # no outage switch

    asyncio.run(scenario())
    assert not admission.breaker.is_open and store.calls == 11
    assert fallbacks(metrics, on_error) == 10


@pytest.mark.parametrize(("reply", "rejected"), [
    ("WRONGTYPE Operation against a key holding the wrong kind of value script: 9f3f, on @user_script:12.", True),
    ("ERR hash value is not an integer script: 5f2a, on @user_script:1.", True),
    ("ERR user_script:1: attempt to perform arithmetic on local 'x' (a nil value) script: 104a, on @user_script:1.", True),
    ("user_script:1: attempt to compare nil with number script: 104a, on @user_script:1.", True),  # redis-py strips "ERR "
    ("OOM command not allowed when used memory > 'maxmemory'. script: 9f3f, on @user_script:4.", False),
    ("READONLY You can't write against a read only replica. script: 9f3f, on @user_script:4.", False),
    ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.", False),
    ("NOSCRIPT No matching script. Please use EVAL.", False),
    ("BUSY Redis is busy running a script.", False),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", False),  # not from a script
])
def test_which_error_replies_are_the_calls_own(reply: str, rejected: bool) -> None:
    assert rejected_for_its_keys(Exception(reply)) is rejected
    assert rejected_for_its_keys(ConnectionError("Connection reset by peer")) is False


def test_release_goes_once_to_the_store_that_admitted() -> None:
    local = MemoryStore(30.0)
    admission = Admission(local, on_error="deny", metrics=Metrics())

    async def scenario() -> tuple[bool, bool]:
        ticket = await admission.admit(PLAN)
        admission.release(PLAN, ticket)
        admission.release(PLAN, ticket)  # a second release is a no-op
        again = await admission.admit(PLAN)
        other = await admission.admit(PLAN)
        return again.admitted, other.admitted

    assert asyncio.run(scenario()) == (True, False)


class HangingStore(BrokenStore):
    """A store whose calls never answer (the caller gets cancelled first)."""

    async def admit(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str, **_: object) -> AdmitResult:
        self.calls += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


def test_a_cancelled_probe_does_not_wedge_the_breaker() -> None:
    clock = [0.0]
    store = HangingStore()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=lambda: clock[0])
    breaker.failure()  # open
    clock[0] = 2.0  # cooldown over: the next call is the probe
    admission = Admission(store, on_error="allow", metrics=Metrics(), breaker=breaker)

    async def scenario() -> None:
        probe = asyncio.ensure_future(admission.admit(PLAN))
        await asyncio.sleep(0.01)
        probe.cancel()  # the client went away while the probe was in flight
        with pytest.raises(asyncio.CancelledError):
            await probe
        second = asyncio.ensure_future(admission.admit(PLAN))
        await asyncio.sleep(0.01)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second

    asyncio.run(scenario())
    assert store.calls == 2  # the second call was let through as a new probe
