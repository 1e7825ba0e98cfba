"""RedisStore under Redis faults, on real redis-server processes: script cache flushed,
server restarted on the same port, server frozen (SIGSTOP), server absent at start, two
replicas racing on one server. Private servers are stopped by their own PID only."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis

from gateway.store.base import StoreError
from gateway.store.redis import RedisStore
from tests.store.conftest import RecordingObserver, rate, slot
from tests.support.redis_server import PrivateRedis, free_port, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

TIMEOUT = 0.2
SLACK = 0.5  # scheduling noise on a busy 2-core machine


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    with private_redis() as started:
        yield started


async def admit_until_admitted(store: RedisStore, lease_prefix: str, seconds: float) -> int:
    """Retry a one-slot admission until it succeeds; return how many attempts failed."""
    deadline = time.monotonic() + seconds
    failures = 0
    while True:
        try:
            result = await store.admit([rate("rpm", 1000, 60_000)], [], f"{lease_prefix}-{failures}")
            assert result.admitted
            return failures
        except StoreError:
            failures += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_script_flush_is_invisible(server: PrivateRedis) -> None:
    observer = RecordingObserver()
    store = RedisStore(server.url, prefix="t", timeout=TIMEOUT, lease=10.0, observer=observer)
    await store.start()
    try:
        requests = slot("requests", 5)
        assert (await store.admit([], [requests], "before")).admitted
        server.client().script_flush()
        assert (await store.admit([], [requests], "after-admit")).admitted
        server.client().script_flush()
        assert await store.renew() == 0  # renew.lua reloads as well
        server.client().script_flush()
        await store.check_ready()
        results = await asyncio.gather(*(store.admit([], [requests], f"burst-{n}") for n in range(10)))
        assert sum(result.admitted for result in results) == 3
        assert observer.errors == {}
    finally:
        await store.aclose()


async def test_store_recovers_after_redis_restarts_on_the_same_port() -> None:
    port = free_port()
    observer = RecordingObserver()
    with private_redis(port=port) as first:
        store = RedisStore(first.url, prefix="t", timeout=TIMEOUT, lease=10.0, observer=observer)
        await store.start()
        try:
            assert (await store.admit([rate("rpm", 10, 60_000)], [], "before")).admitted
            first.stop()
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.admit([rate("rpm", 10, 60_000)], [], "while-down")
            assert time.monotonic() - started < TIMEOUT + SLACK
            with private_redis(port=port):
                # Same store object: stale connections are replaced, scripts reloaded.
                failures = await admit_until_admitted(store, "after", seconds=3)
                assert failures <= 1
                await store.check_ready()
        finally:
            await store.aclose()
    assert observer.errors["admit"] >= 1


async def test_frozen_redis_fails_within_the_timeout_and_recovers(server: PrivateRedis) -> None:
    store = RedisStore(server.url, prefix="t", timeout=TIMEOUT, lease=10.0)
    await store.start()
    requests = slot("requests", 5)
    try:
        assert (await store.admit([], [requests], "warm")).admitted
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            for attempt in range(3):  # pooled connection, then fresh connections
                started = time.monotonic()
                with pytest.raises(StoreError):
                    await store.admit([], [requests], f"frozen-{attempt}")
                assert time.monotonic() - started < TIMEOUT + SLACK
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.check_ready()
            assert time.monotonic() - started < 2 * TIMEOUT + SLACK
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        await admit_until_admitted(store, "thawed", seconds=3)
        store.release([requests], "warm")
    finally:
        await store.aclose()
    # The admissions that timed out were released by the store itself: only what ran and
    # was not released could remain, and nothing was released twice wrongly.
    client = redis.Redis(port=server.port, decode_responses=True)
    leftover: list[str] = client.zrange(requests.key, 0, -1)  # type: ignore[assignment]
    client.close()
    assert "warm" not in leftover
    assert all(member.startswith("frozen-") for member in leftover)


async def test_start_fails_fast_without_redis_and_recovers_later() -> None:
    port = free_port()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="t", timeout=TIMEOUT, lease=10.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.start()
        assert time.monotonic() - started < 2.0
        with private_redis(port=port):
            await admit_until_admitted(store, "late", seconds=3)
            await store.check_ready()
    finally:
        await store.aclose()


async def test_two_replicas_never_admit_more_than_the_limit(redis_url: str) -> None:
    # Real Redis TIME, real concurrency: bursts from two stores interleave within one window.
    replicas = [RedisStore(redis_url, prefix="t", timeout=1.0, lease=10.0) for _ in range(2)]
    for replica in replicas:
        await replica.start()
    try:
        window, requests = rate("rpm", 25, 30_000), slot("requests", 7)
        admitted_rate = 0
        held: list[tuple[RedisStore, str]] = []
        for burst in range(4):
            results = await asyncio.gather(
                *(replicas[n % 2].admit([window], [], f"r-{burst}-{n}") for n in range(20)),
                *(replicas[n % 2].admit([], [requests], f"s-{burst}-{n}") for n in range(20)),
            )
            admitted_rate += sum(result.admitted for result in results[:20])
            for n, result in enumerate(results[20:]):
                if result.admitted:
                    held.append((replicas[n % 2], f"s-{burst}-{n}"))
            assert len(held) <= 7
        assert admitted_rate == 25
        assert len(held) == 7
        for replica, lease_id in held:
            replica.release([requests], lease_id)
    finally:
        for replica in replicas:
            await replica.aclose()
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.zcard(slot("requests", 7).key) == 0
    finally:
        client.close()
