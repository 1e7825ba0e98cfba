"""The ban rule against real client libraries driving real gateway processes on Redis
(issue 16): clients that do what the headers say are never banned, with 16 threads on one key
and one IP; a client that retries at once is banned within 5 s; a flood of 401s is banned
after `strikes` (memory) or within `strikes + 2` (Redis), with 100 connections each
pipelining 10 requests. The ban settings are the defaults (strikes 20 within 1 m, tolerance
16, concurrency_grace 0.5 s): these tests prove what an operator gets out of the box.

Each test uses its own loopback source address, so its client is its own IP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import urllib3
from httpx_retries import Retry as HttpxRetry
from httpx_retries import RetryTransport
from urllib3.util.retry import Retry

from gateway.admission.identity import hash_key
from tests.support.processes import Proc, gateway, mock_upstream, wait_until_in_flight, write_config
from tests.support.secrets import secret

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

RATE_KEY = secret("banclients-rate")
SLOTS_KEY = secret("banclients-slots")
MINUTE_KEY = secret("banclients-minute")
BAD = secret("banclients-bad")
STRIKES = 20  # the default


def config(upstream: str, store_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream, "timeout": "30s"},
        "store": {"url": store_url, "prefix": "banclients"},
        "keys": [
            {"id": "rate", "sha256": hash_key(RATE_KEY), "plan": "tight"},
            {"id": "slots", "sha256": hash_key(SLOTS_KEY), "plan": "slots"},
            {"id": "minute", "sha256": hash_key(MINUTE_KEY), "plan": "minute"},
        ],
        "plans": {
            "tight": {"limits": {"rate": {"rate": "5/2s"}}},
            "slots": {"limits": {"slots": {"concurrency": 2}}},
            "minute": {"limits": {"rate": {"rate": "2/1m"}}},
        },
        "routes": [{"path": "/**", "limits": ["rate", "slots"]}],
        "bans": {},  # every ban setting at its default
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


@pytest.fixture
def gw(upstream: str, redis_url: str, tmp_path: Path) -> Iterator[Proc]:
    with gateway(write_config(tmp_path / "gw.yaml", config(upstream, redis_url))) as proc:
        yield proc
    httpx.post(upstream + "/_release")


def metrics(gw: Proc) -> dict[str, float]:
    """`name{labels}` -> value of the gateway's own counters."""
    values: dict[str, float] = {}
    for line in httpx.get(gw.admin_url + "/metrics").text.splitlines():
        if line.startswith("gateway_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def strikes(gw: Proc) -> dict[str, float]:
    found = metrics(gw)
    return {kind: found.get(f'gateway_ban_strikes_total{{kind="{kind}"}}', 0.0)
            for kind in ("unauthorized", "rate", "concurrency")}


def refused(gw: Proc, outcome: str) -> float:
    return sum(v for k, v in metrics(gw).items()
               if k.startswith("gateway_requests_total{") and f'outcome="{outcome}"' in k)


def bans(gw: Proc) -> list[dict[str, Any]]:
    return httpx.get(gw.admin_url + "/v1/bans").json()


def in_threads(count: int, work: Any) -> list[Any]:
    with ThreadPoolExecutor(count) as pool:
        return [future.result() for future in [pool.submit(work) for _ in range(count)]]


# -- well-behaved clients: never banned -----------------------------------------------------------


def test_urllib3_retry_honouring_retry_after_with_16_threads_is_never_banned(gw: Proc) -> None:
    """urllib3's Retry sleeps the Retry-After of each 429 (`respect_retry_after_header`, its
    default), 16 threads on one PoolManager (connections shared between threads), 5/2s, for
    three windows: thousands of refusals, zero strikes."""
    retry = Retry(total=100, status_forcelist=[429], respect_retry_after_header=True, backoff_factor=0,
                  allowed_methods=None, raise_on_status=False)
    pool = urllib3.PoolManager(maxsize=16, retries=retry, source_address=("127.0.0.21", 0), timeout=30)
    url = gw.url + "/anything"
    started = time.monotonic()

    def work() -> Counter[int]:
        seen: Counter[int] = Counter()
        while time.monotonic() - started < 6.0:
            seen[pool.request("GET", url, headers={"X-API-Key": RATE_KEY}).status] += 1
        return seen

    statuses = sum(in_threads(16, work), Counter())
    elapsed = time.monotonic() - started
    pool.clear()
    assert set(statuses) == {200}, statuses  # no 403, and every request done in the end
    assert elapsed >= 6.0 and statuses[200] >= 15  # at least three full windows of 5
    assert refused(gw, "rate_limited") >= 16  # the threads did meet the limit, again and again
    assert strikes(gw) == {"unauthorized": 0, "rate": 0, "concurrency": 0}
    assert bans(gw) == []


def _backoff_from_half_a_second(client: httpx.Client, url: str, started: float) -> Counter[int]:
    seen: Counter[int] = Counter()
    wait = 0.5
    while time.monotonic() - started < 5.0:
        status = client.get(url, headers={"X-API-Key": SLOTS_KEY}).status_code
        seen[status] += 1
        if status == 429:
            time.sleep(wait)
            wait = min(wait * 2, 4.0)
        else:
            wait = 0.5
    return seen


def _httpx_retries_default(client: httpx.Client, url: str, started: float) -> Counter[int]:
    seen: Counter[int] = Counter()
    while time.monotonic() - started < 5.0:
        seen[client.get(url, headers={"X-API-Key": SLOTS_KEY}).status_code] += 1
    return seen


@pytest.mark.parametrize("client_kind", ["exponential_from_0.5s", "httpx_retries_honouring_retry_after"])
def test_a_concurrency_limited_client_that_backs_off_is_never_banned(gw: Proc, client_kind: str) -> None:
    """2 slots, 16 threads sharing one httpx client and IP, each request held 300 ms upstream:
    a client that backs off 0.5, 1, 2, ... s after each concurrency 429, or httpx-retries with
    its defaults (it honours the 429's `Retry-After: 1`), is never struck."""
    source = {"exponential_from_0.5s": "127.0.0.22", "httpx_retries_honouring_retry_after": "127.0.0.23"}
    transport = httpx.HTTPTransport(local_address=source[client_kind])
    if client_kind == "exponential_from_0.5s":
        client = httpx.Client(transport=transport, timeout=30)
        run = _backoff_from_half_a_second
    else:
        retry = HttpxRetry(total=100, status_forcelist=[429])
        client = httpx.Client(transport=RetryTransport(transport=transport, retry=retry), timeout=30)
        run = _httpx_retries_default
    url = gw.url + "/hold?ms=300"
    started = time.monotonic()
    with client:
        statuses = sum(in_threads(16, lambda: run(client, url, started)), Counter())
    assert 403 not in statuses, statuses
    assert statuses[200] >= 2 * 5 / 0.3 * 0.5  # the slots were kept busy
    assert refused(gw, "concurrency_limited") >= 16
    assert strikes(gw) == {"unauthorized": 0, "rate": 0, "concurrency": 0}
    assert bans(gw) == []


async def _burst(url: str, key: str, source: str, size: int) -> Counter[int]:
    """`size` requests at once from `source`, no retries (an asyncio.gather on a fresh SDK)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    transport = httpx.AsyncHTTPTransport(local_address=source, limits=limits)
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        responses = await asyncio.gather(*(client.get(url, headers={"X-API-Key": key}) for _ in range(size)))
    return Counter(response.status_code for response in responses)


@pytest.mark.parametrize("limit", ["concurrency", "rate"])
def test_a_first_burst_of_any_size_is_not_banned(gw: Proc, upstream: str, limit: str) -> None:
    """One gather of 60 first attempts, no retries, on a 2-slot key (each held 1 s) or a 5/2s
    key: a client that has not read a single answer yet cannot have ignored one. Before: every
    429 past `tolerance` (16) was a strike, and the 20th banned the IP for 5 minutes."""
    key, source = (SLOTS_KEY, "127.0.0.41") if limit == "concurrency" else (RATE_KEY, "127.0.0.42")
    statuses = asyncio.run(_burst(gw.url + "/hold?ms=1000", key, source, 60))
    assert statuses[429] >= 40 and 403 not in statuses, statuses
    assert strikes(gw)[limit] == 0 and bans(gw) == []
    time.sleep(2.1)  # its Retry-After honoured: admitted
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as client:
        assert client.get(gw.url + "/anything", headers={"X-API-Key": key}).status_code == 200
    httpx.post(upstream + "/_release")


def test_a_client_that_keeps_bursting_is_banned(gw: Proc, upstream: str) -> None:
    """Only the first burst is forgiven: the same gather of 60 sent again at once, and again,
    ignoring every answer, is struck from the second on and banned."""
    seen: Counter[int] = Counter()
    for _ in range(4):
        seen += asyncio.run(_burst(gw.url + "/hold?ms=1000", SLOTS_KEY, "127.0.0.43", 60))
        time.sleep(0.3)
        if seen[403]:
            break
    assert seen[403] > 0, seen
    [ban] = bans(gw)
    assert ban["ip"] == "127.0.0.43" and ban["strikes"]["concurrency"] >= STRIKES
    httpx.post(upstream + "/_release")


# -- a hammering client: banned within 5 s ------------------------------------------------------


@pytest.mark.parametrize("limit", ["concurrency", "rate"])
def test_a_client_retrying_at_once_is_banned_within_5_seconds(gw: Proc, upstream: str, limit: str) -> None:
    """httpx-retries told to ignore Retry-After, with no backoff (`backoff_factor=0`): 4
    threads retry every 429 at once. Banned within 5 s; a 403 is not retried."""
    if limit == "concurrency":
        key, source, path = SLOTS_KEY, "127.0.0.24", "/anything"
        # the key's 2 slots held by another of its clients (another IP, never refused)
        holders = [threading.Thread(target=httpx.get, args=(gw.url + "/hold?ms=20000",),
                                    kwargs={"headers": {"X-API-Key": SLOTS_KEY}, "timeout": 30})
                   for _ in range(2)]
        for holder in holders:
            holder.start()
        wait_until_in_flight(upstream, "slots", 2)
    else:
        key, source, path = RATE_KEY, "127.0.0.25", "/anything"
        holders = []
        for _ in range(5):  # the window's 5 requests, used by another of the key's clients
            assert httpx.get(gw.url + path, headers={"X-API-Key": key}).status_code == 200
    retry = HttpxRetry(total=100_000, status_forcelist=[429], backoff_factor=0, respect_retry_after_header=False)
    transport = RetryTransport(transport=httpx.HTTPTransport(local_address=source), retry=retry)
    started = time.monotonic()
    with httpx.Client(transport=transport, timeout=30) as client:
        def work() -> tuple[int, float]:
            response = client.get(gw.url + path, headers={"X-API-Key": key})
            return response.status_code, time.monotonic() - started

        results = in_threads(4, work)
    outcome = "concurrency_limited" if limit == "concurrency" else "rate_limited"
    banned_after = max(took for _, took in results)
    refusals = refused(gw, outcome)
    assert {status for status, _ in results} == {403}
    assert banned_after < 5.0, banned_after
    assert refusals / banned_after >= 10  # it was hammering: >= 10 refused per second
    [ban] = bans(gw)
    # one strike batch may carry a few strikes past the limit (4 threads, one event-loop tick)
    assert ban["ip"] == source and STRIKES <= ban["strikes"][limit] <= STRIKES + 3
    print(f"\n{limit}: {refusals:.0f} refusals, banned after {banned_after:.2f} s")
    httpx.post(upstream + "/_release")
    for holder in holders:
        holder.join(30)


@pytest.mark.parametrize(("limit", "per_second"), [("concurrency", 40), ("rate", 10)])
def test_a_paced_client_ignoring_its_waits_is_banned_within_5_seconds(
    gw: Proc, upstream: str, limit: str, per_second: int
) -> None:
    """The rule's threshold, r > tolerance / told wait (docs/behaviour.md): one thread retrying
    every 429 at r per second, never waiting as told. Concurrency 429s tell 0.5 s, so 40/s
    (> 32/s) is caught; a 2/1m plan tells up to 60 s, so 10/s is. Banned within 5 s."""
    if limit == "concurrency":
        key, source = SLOTS_KEY, "127.0.0.28"
        holders = [threading.Thread(target=httpx.get, args=(gw.url + "/hold?ms=20000",),
                                    kwargs={"headers": {"X-API-Key": SLOTS_KEY}, "timeout": 30})
                   for _ in range(2)]
        for holder in holders:
            holder.start()
        wait_until_in_flight(upstream, "slots", 2)
    else:
        key, source, holders = MINUTE_KEY, "127.0.0.29", []
        for _ in range(2):
            assert httpx.get(gw.url + "/anything", headers={"X-API-Key": key}).status_code == 200
    started = time.monotonic()
    refusals = 0
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as client:
        while time.monotonic() - started < 10:
            status = client.get(gw.url + "/anything", headers={"X-API-Key": key}).status_code
            if status == 403:
                break
            assert status == 429
            refusals += 1
            time.sleep(max(0.0, started + refusals / per_second - time.monotonic()))
    banned_after = time.monotonic() - started
    print(f"\n{limit} at {per_second}/s: banned after {banned_after:.2f} s, {refusals} refusals")
    assert banned_after < 5.0
    [ban] = bans(gw)
    assert ban["ip"] == source and ban["strikes"][limit] == STRIKES
    httpx.post(upstream + "/_release")
    for holder in holders:
        holder.join(30)


# -- 401 floods: exact on memory, within strikes + 2 on Redis --------------------------------------


async def pipelined_flood(port: int, source: str, connections: int, per_connection: int) -> Counter[int]:
    """`connections` connections at once, each writing `per_connection` requests in one go
    (HTTP/1.1 pipelining), then reading every answer."""
    request = (f"GET /anything HTTP/1.1\r\nHost: gw\r\nX-API-Key: {BAD}\r\n\r\n").encode()

    async def one() -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        writer.write(request * per_connection)
        await writer.drain()
        statuses = []
        for _ in range(per_connection):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            statuses.append(int(lines[0].split()[1]))
            length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
            await reader.readexactly(length)
        writer.close()
        return statuses

    answers = await asyncio.gather(*(one() for _ in range(connections)))
    return Counter(status for statuses in answers for status in statuses)


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_401_flood_of_100_connections_pipelining_10_is_banned_at_strikes(
    upstream: str, redis_url: str, tmp_path: Path, store: str
) -> None:
    cfg = config(upstream, redis_url if store == "redis" else "memory://")
    with gateway(write_config(tmp_path / "gw.yaml", cfg)) as gw:
        statuses = asyncio.run(pipelined_flood(gw.port, "127.0.0.26", 100, 10))
        assert sum(statuses.values()) == 1000 and set(statuses) == {401, 403}
        print(f"\n{store}: {statuses[401]} 401s before the 403s (strikes {STRIKES})")
        if store == "memory":
            assert statuses[401] == STRIKES
        else:
            assert STRIKES <= statuses[401] <= STRIKES + 2
        [ban] = bans(gw)
        assert ban["strikes"]["unauthorized"] == STRIKES


def test_two_replicas_on_one_redis_stop_a_flood_across_both(upstream: str, redis_url: str, tmp_path: Path) -> None:
    """The bound across replicas (docs/behaviour.md): each replica has at most one undecided
    strike of a client when the limit is reached, so at most `strikes + replicas - 1` 401s.
    100 connections x 10 pipelined, half on each replica."""
    path = write_config(tmp_path / "gw.yaml", config(upstream, redis_url))
    with gateway(path) as a, gateway(path) as b:

        async def both() -> Counter[int]:
            halves = await asyncio.gather(
                pipelined_flood(a.port, "127.0.0.27", 50, 10), pipelined_flood(b.port, "127.0.0.27", 50, 10)
            )
            return halves[0] + halves[1]

        statuses = asyncio.run(both())
        print(f"\ntwo replicas: {statuses[401]} 401s before the 403s (strikes {STRIKES})")
        assert sum(statuses.values()) == 1000 and set(statuses) == {401, 403}
        assert STRIKES <= statuses[401] <= STRIKES + 2 - 1
        assert [ban["ip"] for ban in bans(a)] == ["127.0.0.27"]
