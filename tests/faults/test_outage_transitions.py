"""Over-admission at the switch to and from `on_error: local`, measured on real redis-server
processes behind a fault proxy, with replicas as `Admission` objects (each its own Redis
connection and local store), so the counts are exact rather than timing-dependent.

Notation (docs/failure-modes.md, "Outage transitions"): a limit N (or L per window), R
replicas, `local_divisor` d, n = max(1, N // d) the local share, c_i the shared slots replica i
holds when Redis disappears. Bounds on what the upstream sees:

- concurrency, switch to local: sum_i max(c_i, n) <= N + (R - 1) n (this replica's shared
  slots are seeded into its local store); before the seeding it was N + R n;
- concurrency, switch back: the local slots still held are mirrored into Redis when it
  answers again, so only the store's decisions before the mirrors land come on top: N + (those)
  (before the mirroring it was N + sum_i (local slots still held) <= N + R n);
- rate, either switch: L + R l per window, l = max(1, L // d).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.admission.breaker import CircuitBreaker
from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission, Ticket
from gateway.metrics import Metrics
from gateway.store.base import RateBucket, SlotBucket
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.faults.conftest import SMALL_KEY, FaultyRedis, fault_config, gateway_for, upstream_stats
from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

TIMEOUT = 0.15
COOLDOWN = 0.3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server: PrivateRedis
    with private_redis() as server, FaultProxy(server.port) as started:
        yield started


@dataclass
class Replica:
    admission: Admission
    store: RedisStore
    local: MemoryStore


@pytest.fixture
async def replicas(proxy: FaultProxy) -> AsyncIterator[list[Replica]]:
    made: list[Replica] = []

    async def make(count: int, divisor: int) -> list[Replica]:
        for _ in range(count):
            store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix="t", timeout=TIMEOUT, lease=10.0)
            await store.start()
            local = MemoryStore(10.0)
            admission = Admission(store, on_error="local", metrics=Metrics(), local=local,
                                  breaker=CircuitBreaker(cooldown=COOLDOWN), local_divisor=divisor)
            made.append(Replica(admission, store, local))
        return made

    yield make  # type: ignore[misc]
    for replica in made:
        await replica.store.aclose()


def slot_plan(n: int) -> AdmissionPlan:
    bucket = SlotBucket("t:{k1}:s:requests", n)
    return AdmissionPlan("p", (), (), (bucket,), (BucketInfo("requests", n, 0.0),), 0.0)


def rate_plan(limit: int, window_ms: int, name: str = "rpm") -> AdmissionPlan:
    bucket = RateBucket(f"t:{{k1}}:r:{name}", limit, window_ms)
    return AdmissionPlan("p", (bucket,), (BucketInfo("rpm", limit, window_ms / 1000),), (), (), 0.0)


async def admit_all(replica: Replica, plan: AdmissionPlan, attempts: int) -> list[Ticket]:
    tickets = [await replica.admission.admit(plan) for _ in range(attempts)]
    return [ticket for ticket in tickets if ticket.admitted]


async def degrade(proxy: FaultProxy, replicas: list[Replica], plan: AdmissionPlan) -> None:
    """Blackhole Redis and let each replica's breaker open (its probes decided locally are
    released at once: they are not part of the measurement)."""
    proxy.set_mode("blackhole")
    for replica in replicas:
        while not replica.admission.degraded:
            ticket = await replica.admission.admit(plan)
            replica.admission.release(plan, ticket)


@pytest.mark.parametrize(("held", "divisor", "n"), [((3,), 1, 3), ((3, 1), 2, 4), ((2, 2), 2, 4)],
                         ids=["one-replica", "two-replicas-uneven", "two-replicas-even"])
async def test_concurrency_at_the_switch_to_local(
    proxy: FaultProxy, replicas, held: tuple[int, ...], divisor: int, n: int  # type: ignore[no-untyped-def]
) -> None:
    group: list[Replica] = await replicas(len(held), divisor)
    plan = slot_plan(n)
    shared = [await admit_all(replica, plan, count) for replica, count in zip(group, held, strict=True)]
    assert [len(tickets) for tickets in shared] == list(held)
    await degrade(proxy, group, plan)
    local = [await admit_all(replica, plan, n) for replica in group]
    in_flight = sum(held) + sum(len(tickets) for tickets in local)
    share = max(1, n // divisor)
    bound = n + (len(group) - 1) * share
    print(f"\n[switch to local] N={n} R={len(group)} d={divisor} shared held {held}: "
          f"{in_flight} in flight (bound {bound}; without seeding {n + len(group) * share})")
    assert in_flight == sum(max(c, share) for c in held)
    assert in_flight <= bound
    # The seeded slots leave with their requests: the local share is whole again.
    for replica, tickets in zip(group, shared, strict=True):
        for ticket in tickets:
            replica.admission.release(plan, ticket)
    for replica, tickets in zip(group, local, strict=True):
        for ticket in tickets:
            replica.admission.release(plan, ticket)
    assert [len(await admit_all(replica, plan, n)) for replica in group] == [share] * len(group)


async def test_concurrency_at_the_switch_back(proxy: FaultProxy, replicas) -> None:  # type: ignore[no-untyped-def]
    """The local slots still held are mirrored into Redis once it answers again: only what
    Redis decided before the mirrors landed (here the breaker's probe) comes on top of them."""
    (replica,) = await replicas(1, 1)
    plan = slot_plan(3)
    await degrade(proxy, [replica], plan)
    local = await admit_all(replica, plan, 3)
    proxy.set_mode("pass")
    await asyncio.sleep(COOLDOWN + 0.05)
    shared: list[Ticket] = []
    for _ in range(20):  # until the breaker's probe is decided by Redis
        ticket = await replica.admission.admit(plan)
        if ticket.store is replica.store:
            shared.append(ticket)
            break
        replica.admission.release(plan, ticket)
        await asyncio.sleep(0.05)
    assert shared, "Redis never decided again"
    assert replica.admission.bridge is not None
    await replica.admission.bridge.settled()  # the local slots are mirrored into Redis now
    shared += await admit_all(replica, plan, 3)
    in_flight = len(local) + len(shared)
    print(f"\n[switch back] N=3 R=1 d=1, 3 local slots held: {in_flight} in flight "
          f"(N + the store's decisions before the mirrors landed; 6 without mirroring)")
    assert in_flight == 4
    for ticket in local + shared:
        replica.admission.release(plan, ticket)
    await replica.store.flush()
    again = await admit_all(replica, plan, 4)  # the mirrors left with their requests
    assert len(again) == 3
    for ticket in again:
        replica.admission.release(plan, ticket)


@pytest.mark.parametrize("refused_before", [False, True], ids=["at-limit", "refused-before"])
async def test_rate_at_the_switch_to_local(proxy: FaultProxy, replicas, refused_before: bool) -> None:  # type: ignore[no-untyped-def]
    """Not lowered in general (a replica keeps no log of its own shared admissions): a key
    that reached L just before the outage gets L more locally. A key Redis had already
    refused keeps that refusal until its Retry-After (the refusal cache), so it gets none."""
    (replica,) = await replicas(1, 1)
    plan = rate_plan(50, 5_000)
    assert len(await admit_all(replica, plan, 51 if refused_before else 50)) == 50
    await degrade(proxy, [replica], rate_plan(1_000_000, 5_000, "probe"))
    local = await admit_all(replica, plan, 60)
    print(f"\n[rate, switch to local, {'refused before' if refused_before else 'at its limit'}] L=50/5s R=1 d=1: "
          f"{50 + len(local)} admitted in one window (bound L + R l = 100)")
    assert 50 + len(local) == (50 if refused_before else 100)


@pytest.mark.e2e
def test_a_gateway_at_the_switch_to_local_keeps_a_3_slot_key_at_3_upstream(
    tmp_path: Path, fresh_upstream: str, faulty_redis: FaultyRedis
) -> None:
    """The figure as the upstream sees it, through a real gateway process (`on_error: local`):
    3 requests hold a 3-slot key's slots through Redis, Redis is blackholed, and 6 more arrive
    at once. Before the seeding the upstream saw 5-6 in flight; now the local store counts the
    3 still holding shared slots and refuses all 6."""
    config = fault_config(fresh_upstream, faulty_redis.url, on_error="local")
    config["plans"]["small"] = {"limits": {"requests": {"concurrency": 3}}}
    config["routes"] = [{"path": "/**", "limits": ["requests"]}]
    with gateway_for(tmp_path, config) as gw:
        with httpx.Client(timeout=30) as client:
            with ThreadPoolExecutor(3) as pool:
                held = [pool.submit(client.get, gw.url + "/hold?ms=20000", headers={"X-API-Key": SMALL_KEY})
                        for _ in range(3)]
                deadline = time.monotonic() + 10
                while upstream_stats(fresh_upstream, "small").get("in_flight", 0) < 3:
                    assert time.monotonic() < deadline, "the 3 holds never reached the upstream"
                    time.sleep(0.02)
                faulty_redis.proxy.set_mode("blackhole")

                async def six_at_once() -> list[int]:
                    async with httpx.AsyncClient(timeout=10) as burst:
                        answers = await asyncio.gather(*(
                            burst.get(gw.url + "/hold?ms=500", headers={"X-API-Key": SMALL_KEY}) for _ in range(6)))
                    return [answer.status_code for answer in answers]

                statuses = asyncio.run(six_at_once())
                peak = upstream_stats(fresh_upstream, "small")["max_in_flight"]
                httpx.post(fresh_upstream + "/_release")
                assert [future.result(10).status_code for future in held] == [200] * 3
        faulty_redis.proxy.set_mode("pass")
    print(f"\n[gateway, switch to local] 3-slot key, 3 held through Redis, 6 more during the outage: "
          f"statuses {sorted(statuses)}, upstream peak {peak} in flight (5-6 before the seeding)")
    assert statuses == [429] * 6
    assert peak == 3
