"""Redis over `maxmemory` with `noeviction`: it refuses writes, so the gateway's scripts fail
with OOM. Then, on a real redis-server:

- every admission (slot buckets, a sliding log, a counter, all of them) is refused by Redis as
  a whole and `on_error` decides (`deny`: 503 StoreUnavailable; `local`: this replica's limits),
  with one clear log line per failing streak and the store-error and fallback metrics counted;
- nothing is left behind: the slots taken before are released (ZREM needs no memory), a job
  that held a slot is ended, no admission wrote anything, every key of ours has a TTL;
- once memory is back, admissions go through Redis again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis

from gateway.admission.breaker import CircuitBreaker
from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission, StoreUnavailable
from gateway.config.model import Store
from gateway.jobs.tracker import JobTracker
from gateway.metrics import Metrics, MetricsObserver
from gateway.store import bundle_for
from gateway.store.base import RateBucket, SlotBucket
from gateway.store.jobs import JobClaim
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.redis_server import PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

COOLDOWN = 0.3
SLOTS = SlotBucket("t:{k1}:s:requests", 3)
LOG = RateBucket("t:{k1}:r:rpm", 100, 60_000)
COUNTER = RateBucket("t:{k1}:a:rpm", 100, 60_000, exact=False)


def plan(rates: tuple[RateBucket, ...], slots: tuple[SlotBucket, ...]) -> AdmissionPlan:
    return AdmissionPlan("p", rates, tuple(BucketInfo("rpm", r.limit, 60.0) for r in rates),
                         slots, tuple(BucketInfo("requests", s.limit, 0.0) for s in slots), 0.0)


PLANS = {
    "slots": plan((), (SLOTS,)),
    "log": plan((LOG,), ()),
    "counter": plan((COUNTER,), ()),
    "all": plan((LOG, COUNTER), (SLOTS,)),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    with private_redis() as started:
        yield started


def fill_memory(client: redis.Redis) -> None:
    """Other data fills Redis; maxmemory is set just below what it uses."""
    client.execute_command("DEBUG", "POPULATE", "20000", "junk", "100")
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) - 200_000))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", "x")


def our_state(client: redis.Redis) -> dict[bytes, int]:
    """Our keys (not the junk) and their member counts, after checking each has a TTL."""
    state = {}
    for key in client.scan_iter("t:*"):
        assert client.pttl(key) > 0, f"{key!r} has no TTL"
        kind = client.type(key)
        state[key] = client.zcard(key) if kind == b"zset" else client.hlen(key) if kind == b"hash" else -1
    return state


@pytest.mark.parametrize("on_error", ["deny", "local"])
async def test_scripts_refused_for_memory_follow_on_error_and_leave_nothing(
    server: PrivateRedis, on_error: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = server.client()
    metrics = Metrics()
    observer = MetricsObserver(metrics)
    store = RedisStore(server.url, prefix="t", timeout=0.5, lease=10.0, observer=observer)
    await store.start()
    local = MemoryStore(10.0)
    admission = Admission(store, on_error=on_error, metrics=metrics,  # type: ignore[arg-type]
                          local=local if on_error == "local" else None, breaker=CircuitBreaker(cooldown=COOLDOWN))
    jobs = JobTracker(bundle_for(store, Store(prefix="t", on_error="deny"), observer).job_stores()).primary
    assert jobs is not None
    try:
        # Before: two requests in flight, and a job holding a slot.
        held = [await admission.admit(PLANS["all"]) for _ in range(2)]
        assert all(ticket.admitted and ticket.store is store for ticket in held)
        job_lease = await admission.admit(PLANS["slots"])
        assert await jobs.hand_over([SLOTS], job_lease.lease_id, JobClaim("job-1", "k1", 3600.0))
        admission.release(PLANS["slots"], job_lease)
        await store.flush()
        before = our_state(client)
        assert before[SLOTS.key.encode()] == 3  # 2 leases + the job

        fill_memory(client)
        outcomes = {}
        for name, each in PLANS.items():
            for attempt in range(4):  # past the breaker's threshold: some decided without a call
                try:
                    ticket = await admission.admit(each)
                except StoreUnavailable:
                    outcomes[(name, attempt)] = "503"
                    continue
                assert ticket.store is not store, f"{name}: admitted by Redis while it refuses writes"
                outcomes[(name, attempt)] = "local" if ticket.store is local or ticket.result else "allow"
                admission.release(each, ticket)
            admission.breaker.success()  # each plan shape meets Redis afresh
        expected = "503" if on_error == "deny" else "local"
        assert set(outcomes.values()) == {expected}, outcomes
        assert our_state(client) == before, "an admission refused for memory wrote something"

        # Ending things needs no memory: the releases and the job's end go through.
        for ticket in held:
            admission.release(PLANS["all"], ticket)
        assert await jobs.end("job-1", None) is not None
        await store.flush()
        after = our_state(client)
        assert after.get(SLOTS.key.encode(), 0) == 0, after

        errors = metrics.registry.get_sample_value("gateway_store_errors_total", {"operation": "admit"}) or 0
        metrics.flush()
        fallbacks = metrics.registry.get_sample_value(
            "gateway_store_fallback_decisions_total", {"mode": on_error}) or 0
        lines = [r.getMessage() for r in caplog.records if r.name == "gateway.admission"]
        failed = [line for line in lines if "store admission failed" in line]
        print(f"\n[OOM, on_error {on_error}] {len(outcomes)} decisions: {errors:.0f} store errors (admit), "
              f"{fallbacks:.0f} fallback decisions; log: {failed[0] if failed else None!r}")
        assert errors >= len(PLANS) and fallbacks == len(outcomes)
        assert failed and "maxmemory" in failed[0] and f"on_error: {on_error}" in failed[0]

        # Memory back: Redis decides again.
        client.config_set("maxmemory", "0")
        await asyncio.sleep(COOLDOWN + 0.05)
        ticket = await admission.admit(PLANS["all"])
        if ticket.store is not store:  # the half-open probe may have been taken: once more
            ticket = await admission.admit(PLANS["all"])
        assert ticket.store is store and ticket.admitted
        admission.release(PLANS["all"], ticket)
        await store.flush()
        assert any("store answers admissions again" in r.getMessage() for r in caplog.records)
    finally:
        await store.aclose()
    assert our_state(client).get(SLOTS.key.encode(), 0) == 0
