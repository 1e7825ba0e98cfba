"""Waiting for a free slot (SPEC §3 `wait`), end to end: waiters are served first come first
served per key (across two gateways on one Redis), are woken promptly when a slot frees on
either gateway, get `concurrency_limited` when the wait runs out, hold no upstream
connection while waiting, and leave the queue at once when their client goes away."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.invariants import assert_no_leaks
from tests.support.processes import Proc, gateway, mock_upstream, write_config

pytestmark = pytest.mark.e2e

SECRET = "waiting-key-secret-1"
PREFIX = "gwwait"
HEADERS = {"X-API-Key": SECRET}


def wait_config(upstream: str, store: str, wait: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream, "timeout": "20s"},
        "store": {"url": store, "prefix": PREFIX, "timeout": "500ms", "lease": "5s", "on_error": "deny"},
        "keys": [{"id": "w", "sha256": hash_key(SECRET), "plan": "p"}],
        "plans": {"p": {"limits": {"requests": {"concurrency": 1, "wait": wait}}}},
        "routes": [{"path": "/**", "limits": ["requests"]}],
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def gateways(tmp_path: Path, upstream: str) -> Iterator[Callable[[str, str, int], list[Proc]]]:
    httpx.post(upstream + "/_reset")
    contexts: list[Any] = []

    def started(store: str, wait: str, count: int) -> list[Proc]:
        path = write_config(tmp_path / "gw.yaml", wait_config(upstream, store, wait))
        procs = []
        for _ in range(count):
            context = gateway(path)
            contexts.append(context)
            procs.append(context.__enter__())
        return procs

    yield started
    httpx.post(upstream + "/_release")
    for context in reversed(contexts):
        context.__exit__(None, None, None)


def arrivals(upstream: str) -> int:
    return int(httpx.get(upstream + "/_stats").json()["keys"].get("w", {}).get("total", 0))


def queued_in(client: redis.Redis) -> int:
    """Waiters queued in Redis, over every queue of the test's prefix."""
    return sum(int(client.zcard(key)) for key in client.scan_iter(match=f"{PREFIX}:*:q"))


async def queued_after(client: redis.Redis, within: float) -> int:
    """`queued_in` once it is 0, or after `within` seconds."""
    deadline = time.monotonic() + within
    while queued_in(client) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return queued_in(client)


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, float, dict[str, str]]:
    async with session.get(url, headers=HEADERS) as response:
        await response.read()
        return response.status, time.monotonic(), {k.lower(): v for k, v in response.headers.items()}


def test_waiters_are_served_in_arrival_order_and_woken_promptly(
    gateways: Callable[[str, str, int], list[Proc]], upstream: str, store_url: str
) -> None:
    procs = gateways(store_url, "5s", 1 if store_url == "memory://" else 2)
    urls = [proc.url for proc in procs]

    async def run() -> tuple[list[tuple[int, float, dict[str, str]]], float]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            holder = asyncio.ensure_future(_get(session, urls[0] + "/hold?ms=15000"))
            await asyncio.sleep(0.3)
            waiters = []
            for n in range(6):  # alternating gateways: one queue per key across replicas
                url = f"{urls[n % len(urls)]}/delay_headers?ms=150&n={n}"
                waiters.append(asyncio.ensure_future(_get(session, url)))
                await asyncio.sleep(0.08)
            await asyncio.sleep(0.3)
            assert arrivals(upstream) == 1  # nobody waiting holds an upstream connection
            released = time.monotonic()
            async with session.post(upstream + "/_release") as response:
                assert response.status == 200
            assert (await holder)[0] == 200
            return list(await asyncio.gather(*waiters)), released

    results, released = asyncio.run(run())
    assert [status for status, _, _ in results] == [200] * 6
    finished = [at for _, at, _ in results]
    assert finished == sorted(finished)  # served one at a time, first come first served
    # Each waiter was woken by the release before it (not by its 0.5 s re-check timer): six
    # 150 ms requests back to back, plus little more than one timer period of slack in all.
    assert finished[0] - released < 0.15 + 0.4
    assert finished[-1] - released < 6 * 0.15 + 0.6
    stats = httpx.get(upstream + "/_stats").json()["keys"]["w"]
    assert stats["max_in_flight"] == 1 and stats["total"] == 7


def test_a_wait_that_runs_out_gets_concurrency_limited(
    gateways: Callable[[str, str, int], list[Proc]], upstream: str, store_url: str
) -> None:
    (gw,) = gateways(store_url, "1s", 1)

    async def run() -> tuple[int, float, dict[str, str], dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            holder = asyncio.ensure_future(_get(session, gw.url + "/hold?ms=15000"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            async with session.get(gw.url + "/echo", headers=HEADERS) as response:
                body = await response.json(content_type=None)
                status, took = response.status, time.monotonic() - started
                headers = {k.lower(): v for k, v in response.headers.items()}
            await session.post(upstream + "/_release")
            await holder
            return status, took, headers, body

    status, took, headers, body = asyncio.run(run())
    assert status == 429 and body["error"] == "concurrency_limited"
    assert headers["retry-after"] == "1" and headers["concurrency-remaining"] == "0"
    assert 0.9 <= took < 3.0
    assert arrivals(upstream) == 1  # the waiter never reached the upstream


@pytest.mark.redis
def test_a_waiter_whose_client_leaves_leaves_the_queue_at_once(
    gateways: Callable[[str, str, int], list[Proc]], upstream: str, redis_url: str, redis_sync: redis.Redis
) -> None:
    gw, other = gateways(redis_url, "8s", 2)

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            holder = asyncio.ensure_future(_get(session, gw.url + "/hold?ms=15000"))
            await asyncio.sleep(0.3)
            with pytest.raises(asyncio.TimeoutError):
                async with session.get(gw.url + "/gone", headers=HEADERS,
                                       timeout=aiohttp.ClientTimeout(total=0.5)):
                    pass
            # Entries live 2 s unless refreshed; a disconnect removes them within a moment.
            assert await queued_after(redis_sync, 0.5) == 0
            await session.post(upstream + "/_release")
            await holder
            # Nobody is ahead of a newcomer on the other gateway: admitted at once.
            started = time.monotonic()
            status, _, headers = await _get(session, other.url + "/now")
            assert status == 200 and time.monotonic() - started < 0.5
            assert headers["concurrency-remaining"] == "0"

    asyncio.run(run())
    assert arrivals(upstream) == 2  # the holder and the newcomer; the vanished waiter never
    assert_no_leaks(redis_sync, PREFIX)


def test_a_waiter_with_requests_pipelined_behind_it_leaves_the_queue_when_its_client_does(
    gateways: Callable[[str, str, int], list[Proc]], upstream: str, redis_url: str, redis_sync: redis.Redis
) -> None:
    """uvicorn tells a lost connection only to its newest request cycle, a queued one when
    requests are pipelined behind the running one: the waiter never heard its client leave,
    kept its place for the whole `wait` and was then admitted for nobody. The server protocol
    now tells the running cycle too."""
    (gw,) = gateways(redis_url, "8s", 1)

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            holder = asyncio.ensure_future(_get(session, gw.url + "/hold?ms=15000"))
            await asyncio.sleep(0.3)
            head = f"GET /gone HTTP/1.1\r\nHost: x\r\nX-API-Key: {SECRET}\r\n\r\n".encode()
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(head * 2)  # the first waits for the slot, the second behind it
                deadline = time.monotonic() + 2
                while not queued_in(redis_sync):
                    assert time.monotonic() < deadline, "the first never queued"
                    await asyncio.sleep(0.02)
            assert await queued_after(redis_sync, 0.5) == 0  # a disconnect removes the entry within a moment
            await session.post(upstream + "/_release")
            assert (await holder)[0] == 200

    asyncio.run(run())
    assert arrivals(upstream) == 1  # the holder; the vanished waiter was never forwarded
    assert_no_leaks(redis_sync, PREFIX)


def metric(proc: Proc, name: str, **labels: str) -> float:
    text = httpx.get(proc.admin_url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_a_waiter_whose_client_leaves_is_disconnected_not_refused_and_never_struck(
    tmp_path: Path, upstream: str, store_url: str
) -> None:
    """Leaving while queued is no refusal: outcome `disconnected` (499 in the access log), no
    ban strike. Before, it was logged and counted as `429 concurrency_limited` and struck the
    client's IP. With `tolerance: 0` every 429 is a strike: a waiter whose wait runs out is one."""
    httpx.post(upstream + "/_reset")
    cfg = {**wait_config(upstream, store_url, "1s"), "bans": {"strikes": 20, "tolerance": 0}}
    with gateway(write_config(tmp_path / "gw.yaml", cfg)) as gw:

        async def run() -> int:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                holder = asyncio.ensure_future(_get(session, gw.url + "/hold?ms=15000"))
                await asyncio.sleep(0.3)
                with pytest.raises(asyncio.TimeoutError):
                    async with session.get(gw.url + "/gone", headers=HEADERS,
                                           timeout=aiohttp.ClientTimeout(total=0.3)):
                        pass
                deadline = time.monotonic() + 3
                while not metric(gw, "gateway_requests_total", outcome="disconnected"):
                    assert time.monotonic() < deadline, "the waiter that left was never counted"
                    await asyncio.sleep(0.05)
                assert metric(gw, "gateway_ban_strikes_total", kind="concurrency") == 0
                status, _, _ = await _get(session, gw.url + "/stays")  # waits its 1 s out
                await session.post(upstream + "/_release")
                await holder
                return status

        assert asyncio.run(run()) == 429
        assert metric(gw, "gateway_ban_strikes_total", kind="concurrency") == 1  # only the 429
        assert metric(gw, "gateway_requests_total", outcome="concurrency_limited") == 1
        assert metric(gw, "gateway_requests_total", outcome="disconnected") == 1
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith('{"time"')]
    assert [(line["status"], line["outcome"]) for line in lines if line["path"] == "/gone"] == [(499, "disconnected")]
    assert arrivals(upstream) == 1  # the holder alone
