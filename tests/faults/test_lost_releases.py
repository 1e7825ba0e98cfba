"""A release that meets an outage (Redis unreachable, stalled, refusing) lands once it ends.

A release is a ZREM of the lease's members. Before, one that failed twice was dropped with a
warning, and its slot looked held until the lease ran out (30 s by default): after a blip of
a second, a client within its concurrency got 429s for half a minute. Now each is sent again
until it lands or a lease has passed, on both transports.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.store.base import SlotBucket
from gateway.store.redis import RedisStore
from tests.faults.conftest import PREFIX, FaultyRedis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

TRANSPORTS = ["pipelined", "redis-py"]


def store_url(port: int, transport: str) -> str:
    url = f"redis://127.0.0.1:{port}/0"
    # Any query option but db sends the URL to redis-py (gateway/store/pipelined.py, Endpoint).
    return url if transport == "pipelined" else url + "?client_name=gw-lost-releases"


@pytest.mark.parametrize("fault", ["blackhole", "refuse", "reset"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_releases_that_meet_an_outage_land_when_it_ends(
    faulty_redis: FaultyRedis, transport: str, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    store = RedisStore(store_url(faulty_redis.proxy.port, transport), prefix=PREFIX, timeout=0.2, lease=30.0)
    await store.start()
    key = f"{PREFIX}:{{lost-{transport}-{fault}}}:c:req"
    slots = [SlotBucket(key, 3)]
    direct = faulty_redis.client()
    try:
        for n in range(3):
            assert (await store.admit([], slots, f"lease-{n}")).admitted
        assert not (await store.admit([], slots, "a-fourth")).admitted  # full
        faulty_redis.proxy.set_mode(fault)
        for n in range(3):  # the three requests end during the outage
            store.release(slots, f"lease-{n}")
        await asyncio.sleep(1.0)  # five store timeouts: every send so far has failed
        assert direct.zcard(key) == 3  # nothing landed
        faulty_redis.proxy.set_mode("pass")
        started = time.monotonic()
        while direct.zcard(key) and time.monotonic() - started < 3.0:
            await asyncio.sleep(0.05)
        assert direct.zcard(key) == 0, "the releases never landed (their slots held until the lease)"
        assert (await store.admit([], slots, "after")).admitted
        said = [record.getMessage() for record in caplog.records]
        # The operator reads both ends of the streak, each once (the pipelined transport never
        # said the second before).
        assert sum(m.startswith("store releases are failing") for m in said) == 1, said
        assert said.count("store releases land again") == 1, said
        print(f"\n[{transport}, {fault}] released {time.monotonic() - started:.2f} s after the outage ended")
    finally:
        await store.aclose()
        direct.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_settlement_given_up_still_frees_its_slot(faulty_redis: FaultyRedis, transport: str) -> None:
    """A release carrying a settlement is one settle.lua call: sent once more, then given up
    (the charge stays at the route's price). Its slot must be freed all the same."""
    from gateway.store.base import Charge, RateBucket, Settlement

    store = RedisStore(store_url(faulty_redis.proxy.port, transport), prefix=PREFIX, timeout=0.2, lease=30.0)
    await store.start()
    tag = f"{PREFIX}:{{settle-{transport}}}"
    credits = RateBucket(f"{tag}:r:credits", 100, 60_000, counts_cost=True)
    slots = [SlotBucket(f"{tag}:c:req", 1)]
    direct = faulty_redis.client()
    try:
        admitted = await store.admit([credits], slots, "lease", charge=Charge(5))
        assert admitted.admitted
        faulty_redis.proxy.set_mode("refuse")
        store.release(slots, "lease", settlement=Settlement((credits,), (), 5, 2, admitted.now_ms))
        await asyncio.sleep(1.0)
        assert direct.zcard(f"{tag}:c:req") == 1
        faulty_redis.proxy.set_mode("pass")
        started = time.monotonic()
        while direct.zcard(f"{tag}:c:req") and time.monotonic() - started < 3.0:
            await asyncio.sleep(0.05)
        assert direct.zcard(f"{tag}:c:req") == 0, "the unsettled release held its slot"
        # The 5 units charged are kept (no refund to 2): what was counted before this one.
        assert (await store.admit([credits], slots, "next", charge=Charge(1))).rate_counts == [5]
    finally:
        await store.aclose()
        direct.close()
