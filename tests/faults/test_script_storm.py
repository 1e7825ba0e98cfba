"""1,000 admissions in flight when Redis loses its scripts: zero failed decisions.

Redis forgets every script on `SCRIPT FLUSH`, on a restart and on a Sentinel failover (the new
master never loaded them). Every admission then meets NOSCRIPT (and, after a restart, a dead
connection; after a failover, a demoted master). The store answers with one shared reload
and sends each call again once (gateway/store/redis.py). Before, every call ran its own
SCRIPT LOAD of every script: 1,000 in flight → 901 failed and the breaker tripped.

Each test drives the real admission controller with `on_error: deny` at the default
`store.timeout` (see TIMEOUT), 1,000 concurrent admissions on a 600-slot plan, and prints the
counts: exactly 600 admitted and 400 refused (the limit stays exact through the storm), no
failure, breaker closed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import redis
import redis.asyncio as aredis

from gateway.admission.buckets import AdmissionPlan
from gateway.admission.controller import Admission, StoreUnavailable
from gateway.metrics import Metrics
from gateway.store.base import RateBucket, SlotBucket
from gateway.store.redis import RedisStore
from tests.support.redis_server import free_port, private_redis
from tests.support.topologies import sentinel_group

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

# Twice and a half the default store.timeout: 1,000 admissions cost ~0.1 s of CPU on one
# core here (measured without any fault), and this machine's two cores are shared; the storm,
# not the CPU, is what is measured. On an idle machine 0.1 s passes too.
TIMEOUT = 0.25
IN_FLIGHT = 1000
SLOTS = 600


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def plan(tag: str) -> AdmissionPlan:
    return AdmissionPlan(
        plan="storm",
        rates=(RateBucket(f"t:{{{tag}}}:r:rpm", 1_000_000, 60_000),),
        rate_info=(),
        slots=(SlotBucket(f"t:{{{tag}}}:s:req", SLOTS),),
        slot_info=(),
        wait=0.0,
    )


def script_loads(port: int) -> int:
    """SCRIPT LOAD commands this server has run since it started."""
    with redis.Redis(port=port, socket_timeout=2) as client:
        stats = client.info("commandstats")
    return int(stats.get("cmdstat_script|load", {}).get("calls", 0))


async def storm(
    store: RedisStore,
    name: str,
    tag: str,
    fault: Callable[[], Awaitable[None]],
    during: Callable[[], Awaitable[None]] | None = None,
    port: Callable[[], int] | None = None,
) -> Counter[str]:
    """`fault` (the gateway idle, its connections and scripts gone stale), then 1,000
    admissions at once, with `during` run while they are in flight; returns the counts and
    releases every admitted lease."""
    admission = Admission(store, on_error="deny", metrics=Metrics())
    the_plan = plan(tag)
    warm = await admission.admit(the_plan)  # connections and scripts in place before the fault
    admission.release(the_plan, warm)
    await store.flush()
    await fault()
    loads_before = script_loads(port()) if port is not None else 0
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        try:
            ticket = await admission.admit(the_plan)
        except StoreUnavailable:
            outcomes["failed"] += 1
            return
        outcomes["admitted" if ticket.admitted else "refused"] += 1
        tickets.append(ticket)

    async def meanwhile() -> None:
        if during is not None:
            await asyncio.sleep(0)  # the burst has been written
            await during()

    tickets: list = []
    await asyncio.gather(*(one() for _ in range(IN_FLIGHT)), meanwhile())
    tripped = admission.breaker.is_open
    loads = script_loads(port()) - loads_before if port is not None else -1
    for ticket in tickets:
        if ticket.admitted:
            admission.release(the_plan, ticket)
    await store.flush()
    print(f"\n[{name}] {IN_FLIGHT} in flight: admitted={outcomes['admitted']} refused={outcomes['refused']} "
          f"failed={outcomes['failed']} breaker_tripped={tripped} SCRIPT LOADs={loads}")
    outcomes["tripped"] = int(tripped)
    outcomes["script_loads"] = loads
    return outcomes


# admit, renew, undo and settle: one shared reload is four SCRIPT LOADs. A reload per call that
# met NOSCRIPT would be ~4,000.
SCRIPTS = 4


def assert_exact(outcomes: Counter[str], reloads: int = 1) -> None:
    assert 0 < outcomes["script_loads"] <= reloads * SCRIPTS
    assert outcomes["failed"] == 0
    assert outcomes["tripped"] == 0
    assert outcomes["admitted"] == SLOTS and outcomes["refused"] == IN_FLIGHT - SLOTS


@pytest.mark.parametrize("transport", ["pipelined", "redis-py"])
async def test_script_flush_under_1000_in_flight(transport: str) -> None:
    with private_redis() as server:
        url = server.url if transport == "pipelined" else server.url + "?client_name=gw-storm"
        store = RedisStore(url, prefix="t", timeout=TIMEOUT, lease=10.0)
        await store.start()
        flusher = aredis.Redis(port=server.port)

        async def flush() -> None:
            await flusher.script_flush()

        try:
            outcomes = await storm(store, f"SCRIPT FLUSH before and during, {transport}", "flush", flush, flush,
                                   port=lambda: server.port)
        finally:
            await store.aclose()
            await flusher.aclose()
    # One reload per flush, and one more for the calls the second flush caught between the
    # first reload and their resend.
    assert_exact(outcomes, reloads=3)


@pytest.mark.parametrize("transport", ["pipelined", "redis-py"])
async def test_redis_restart_under_1000_in_flight(transport: str) -> None:
    """Restarted on the same port (no persistence): every pooled connection is dead and every
    script gone."""
    port = free_port()
    with private_redis(port=port) as first:
        url = first.url if transport == "pipelined" else first.url + "?client_name=gw-storm"
        store = RedisStore(url, prefix="t", timeout=TIMEOUT, lease=10.0)
        await store.start()
        restarted = []

        async def restart() -> None:
            first.stop()
            restarted.append(private_redis(port=port))
            restarted[0].__enter__()

        try:
            outcomes = await storm(store, f"Redis restart, {transport}", "restart", restart, port=lambda: port)
        finally:
            await store.aclose()
            if restarted:
                restarted[0].__exit__(None, None, None)
    assert_exact(outcomes)


async def test_sentinel_failover_under_1000_in_flight() -> None:
    """SENTINEL FAILOVER: the old master is demoted (READONLY) and the new one has no scripts.
    The store has not yet noticed the move by itself (it asks the Sentinels every second):
    READONLY sends it to ask at once, then to reload the scripts on the new master."""
    with sentinel_group() as group:
        store = RedisStore(group.url, prefix="t", timeout=TIMEOUT, lease=10.0)
        await store.start()

        async def failover() -> None:
            for _ in range(100):  # the Sentinels need a moment before a replica is promotable
                try:
                    await asyncio.to_thread(group.failover)
                    break
                except redis.ResponseError as exc:
                    if "NOGOODSLAVE" not in str(exc):
                        raise
                    await asyncio.sleep(0.2)
            # Until Sentinel has demoted the old master it still takes writes (the split brain
            # docs/failure-modes.md describes); the storm starts once it answers READONLY.
            with redis.Redis(port=group.master.port, socket_timeout=2) as old_master:
                for _ in range(100):
                    if old_master.info("replication")["role"] == "slave":
                        break
                    await asyncio.sleep(0.1)
            with redis.Redis(port=group.master_port()) as new_master:
                new_master.script_flush()  # in case the replica had the scripts

        try:
            outcomes = await storm(store, "Sentinel failover", "failover", failover, port=group.master_port)
        finally:
            await store.aclose()
    assert_exact(outcomes)
