from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest

from gateway.admission.breaker import CircuitBreaker
from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission, StoreUnavailable
from gateway.metrics import Metrics
from gateway.store.base import (
    AdmissionStore,
    AdmitResult,
    RateBucket,
    SlotBucket,
    StoreError,
    StoreRejected,
    rejected_for_its_keys,
)
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
    # An ACL denial inside a script (Redis 7.0: ERR, not NOPERM): the store's user, every call.
    ("ERR The user executing the script can't run this command or subcommand script: 886b, on @user_script:1.",
     False),
    ("The user executing the script can't run this command or subcommand script: 886b, on @user_script:1.",
     False),  # redis-py without "ERR "
    ("ERR The user executing the script can't access at least one of the keys mentioned in the command "
     "arguments script: e4a8, on @user_script:1.", False),
    ("ERR The user executing the script can't publish to the channel mentioned in the command script: 7d25, "
     "on @user_script:1.", False),
    ("NOPERM User gw has no permissions to run the 'zrem' command script: 886b, on @user_script:1.", False),
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


class TwoPrimariesStore(BrokenStore):
    """A Cluster-like store of two primaries, "a" and "b", by hash tag: "a" is down (every call
    fails as a timeout would), "b" answers."""

    def __init__(self) -> None:
        super().__init__()
        self.good = MemoryStore(30.0)
        self.calls_to = {"a": 0, "b": 0}
        self.down = {"a"}

    def failure_domain(self, tag: str) -> object:
        return "a" if tag == "gw:{k:1}" else "b"

    async def admit(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str, **kw: object) -> AdmitResult:
        primary = "a" if (rates or slots)[0].key.startswith("gw:{k:1}") else "b"
        self.calls_to[primary] += 1
        if primary in self.down:
            raise StoreError("timeout")
        return await self.good.admit(rates, slots, lease_id, **kw)  # type: ignore[arg-type]


ON_A = dataclasses.replace(PLAN, tag="gw:{k:1}")
ON_B = dataclasses.replace(OTHER, tag="gw:{k:2}")


def test_a_primary_down_opens_its_own_breaker_only() -> None:
    """Cluster: a failing primary sends its own keys to on_error; the other's keep the store
    (one breaker for the whole store sent every key to on_error)."""
    clock = [0.0]
    store = TwoPrimariesStore()
    admission = Admission(store, on_error="deny", metrics=Metrics(),
                          breaker=CircuitBreaker(threshold=3, cooldown=1.0, clock=lambda: clock[0]))
    assert admission.breakers is not None

    async def scenario() -> tuple[int, int]:
        refused = admitted = 0
        for _ in range(20):  # interleaved, as keys of both primaries come
            try:
                await admission.admit(ON_A)
            except StoreUnavailable:
                refused += 1
            ticket = await admission.admit(ON_B)
            admitted += ticket.admitted and ticket.result is not None
        return refused, admitted

    refused, admitted = asyncio.run(scenario())
    assert (refused, admitted) == (20, 20)  # b's keys decided by the store every time
    assert store.calls_to == {"a": 3, "b": 20}  # a's breaker opened after three; b's never
    assert admission.degraded  # readiness: a primary is skipped
    store.down.clear()
    clock[0] = 1.5  # a's cooldown over: its probe succeeds and closes it
    assert asyncio.run(admission.admit(ON_A)).result is not None
    assert not admission.degraded and store.calls_to["a"] == 4


def test_a_single_server_store_keeps_one_breaker() -> None:
    admission = Admission(MemoryStore(30.0), on_error="deny", metrics=Metrics())
    assert admission.breakers is None  # no lookup on the hot path
    store = BrokenStore()
    assert Admission(store, on_error="deny", metrics=Metrics()).breakers is None


def test_domain_breakers_forget_clean_domains_past_the_bound() -> None:
    from gateway.admission.breaker import MAX_DOMAINS, DomainBreakers

    default = CircuitBreaker()
    breakers = DomainBreakers(lambda tag: tag, default)
    failing = breakers.for_tag("failing")
    failing.failure()
    for n in range(3 * MAX_DOMAINS):  # primaries that come and go (failovers, new addresses)
        breakers.for_tag(f"node{n}")
    assert len(breakers._by_domain) <= MAX_DOMAINS + 1
    assert breakers.for_tag("failing") is failing and not breakers.clean  # a failure is kept
    assert breakers.for_tag(None) is default  # type: ignore[arg-type]  # domain unknown: the store's


def test_under_local_the_outage_ends_only_when_every_primary_answers() -> None:
    """The bridge mirrors local slots back into the store when the outage is over: with one
    primary still down, an answer from another must not end it (else every request would flip
    the bridge, seeding and mirroring in-flight slots each time)."""
    store = TwoPrimariesStore()
    admission = Admission(store, on_error="local", metrics=Metrics(), local=MemoryStore(30.0))
    bridge = admission.bridge
    assert bridge is not None

    async def scenario() -> list[bool]:
        seen = []
        await admission.admit(ON_A)  # a fails: decided locally, the bridge degrades
        seen.append(bridge.degraded)
        await admission.admit(ON_B)  # b answers, a has not yet
        seen.append(bridge.degraded)
        store.down.clear()
        await admission.admit(ON_A)  # a answers: every primary has, the outage is over
        seen.append(bridge.degraded)
        await bridge.settled()
        return seen

    assert asyncio.run(scenario()) == [True, True, False]


def _local_admission(store: AdmissionStore, clock: list[float]) -> Admission:
    """An admission on `store` under `on_error: local`, its breaker (3 failures, 1 s cooldown)
    on the clock `clock[0]`."""
    return Admission(store, on_error="local", metrics=Metrics(), local=MemoryStore(30.0),
                     breaker=CircuitBreaker(threshold=3, cooldown=1.0, clock=lambda: clock[0]))


def test_a_failed_primary_no_longer_asked_for_stops_counting() -> None:
    """A primary fails, its replica takes its slots over (a new domain, answering): the dead
    primary's breaker, open and never asked again, must not keep the store degraded (readiness
    503 under deny for ever) nor keep the outage going under local."""
    from gateway.admission.breaker import STALE_AFTER

    clock = [0.0]
    store = TwoPrimariesStore()
    admission = _local_admission(store, clock)
    bridge = admission.bridge
    assert bridge is not None

    async def scenario() -> None:
        for _ in range(3):
            await admission.admit(ON_A)  # a fails: its breaker opens, decided locally
        assert admission.degraded and bridge.degraded
        store.down.clear()
        store.failure_domain = lambda tag: "a's replica" if tag == "gw:{k:1}" else "b"  # type: ignore[method-assign]
        await admission.admit(ON_A)  # the replica answers: a new domain, a fresh breaker
        assert admission.degraded  # a's breaker, recently failing, still counts...
        clock[0] = STALE_AFTER + 1
        assert not admission.degraded  # ...until nobody has asked it for a while
        await admission.admit(ON_B)
        assert not bridge.degraded  # the outage ended: local slots mirrored back
        await bridge.settled()

    asyncio.run(scenario())


def test_one_primary_down_is_one_failing_streak_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """The log says "failed" once when a streak starts and "answers again" once when every
    primary answers: not a pair of lines at each answer of a healthy primary in between."""
    clock = [0.0]
    store = TwoPrimariesStore()
    admission = Admission(store, on_error="allow", metrics=Metrics(),
                          breaker=CircuitBreaker(threshold=3, cooldown=1.0, clock=lambda: clock[0]))

    async def scenario() -> None:
        for second in range(5):  # a's probe fails every second, b answers in between
            clock[0] = second * 1.5
            for _ in range(4):
                await admission.admit(ON_A)
                await admission.admit(ON_B)
        store.down.clear()
        clock[0] = 10.0
        await admission.admit(ON_A)

    with caplog.at_level("INFO", logger="gateway.admission"):
        asyncio.run(scenario())
    lines = [record.getMessage() for record in caplog.records]
    assert sum("store admission failed" in line for line in lines) == 1, lines
    assert sum("answers admissions again" in line for line in lines) == 1, lines


def test_a_failed_start_on_cluster_does_not_keep_the_outage_going() -> None:
    """The gateway starts while the store is down (state.open: one failure for the store as a
    whole); once every primary answers, nothing may keep counting that start: it is asked no
    more (every call has its primary), so after a while it is closed again."""
    from gateway.admission.breaker import STALE_AFTER

    clock = [0.0]
    store = TwoPrimariesStore()
    store.down.clear()
    admission = _local_admission(store, clock)
    admission.breaker.failure()  # what state.open does when the store's start fails

    async def scenario() -> bool:
        await admission.admit(ON_A)
        await admission.admit(ON_B)
        clock[0] = STALE_AFTER + 1
        return admission._all_answer()

    assert asyncio.run(scenario())


def test_a_readiness_probe_that_passes_ends_the_outage_without_traffic(caplog: pytest.LogCaptureFixture) -> None:
    """The readiness probe's success counts as an admission's: it closes the breaker, and under
    `local` the slots go back to the store (before, only a client request did, and a replica
    pulled from traffic for being degraded stayed so for ever)."""
    clock = [0.0]
    store = BrokenStore()
    admission = _local_admission(store, clock)
    bridge = admission.bridge
    assert bridge is not None

    async def scenario() -> None:
        for _ in range(3):
            await admission.admit(PLAN)
        assert admission.degraded and bridge.degraded
        with caplog.at_level("INFO", logger="gateway.admission"):
            admission.store_answered("gw:{ready}")  # no request, no cooldown waited for
        assert not admission.degraded and not bridge.degraded
        await bridge.settled()

    asyncio.run(scenario())
    assert "store answers admissions again" in caplog.text


def test_on_cluster_a_readiness_probe_speaks_for_its_primary_only() -> None:
    """Cluster: the probe's keys live on one primary; its success closes that primary's breaker,
    not another's, and the outage (under `local`) ends only once every primary has answered."""
    clock = [0.0]
    store = TwoPrimariesStore()
    store.down = {"a", "b"}
    admission = _local_admission(store, clock)
    bridge = admission.bridge
    assert bridge is not None

    async def scenario() -> None:
        for _ in range(3):
            await admission.admit(ON_A)
            await admission.admit(ON_B)
        assert admission.degraded and bridge.degraded
        admission.store_answered("gw:{k:2}")  # b answers the probe; a's breaker stays open
        assert admission.degraded and bridge.degraded
        admission.store_answered("gw:{k:1}")
        assert not admission.degraded and not bridge.degraded
        await bridge.settled()

    asyncio.run(scenario())
