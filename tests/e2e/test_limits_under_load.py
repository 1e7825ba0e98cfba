"""The limits hold under concurrent load across two gateway processes sharing one Redis,
counted by what the upstream actually receives."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.invariants import assert_no_leaks, max_in_window
from tests.support.processes import gateway, mock_upstream, write_config
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

PREFIX = "gwload"
HOT, COLD = secret("hot"), secret("cold")


def _config(upstream: str, redis_url: str, limits: dict[str, Any], route_limits: list[str]) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream, "timeout": "10s"},
        "store": {"url": redis_url, "prefix": PREFIX, "timeout": "500ms", "lease": "5s", "on_error": "deny"},
        "keys": [
            {"id": "hot", "sha256": hash_key(HOT), "plan": "p"},
            {"id": "cold", "sha256": hash_key(COLD), "plan": "p"},
        ],
        "plans": {"p": {"limits": limits}},
        "routes": [{"path": "/**", "limits": route_limits}],
    }


async def _hammer(
    urls: list[str], secret: str, path: str, clients: int, per_client: int
) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    """`clients` concurrent connections, each sending `per_client` requests, round-robin over
    the gateways; returns (status, body, headers) of every answer."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    results: list[tuple[int, dict[str, Any], dict[str, str]]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(n: int) -> None:
            for i in range(per_client):
                url = urls[(n + i) % len(urls)] + path
                async with session.get(url, headers={"X-API-Key": secret}) as response:
                    body = await response.json(content_type=None)
                    results.append((response.status, body, {k.lower(): v for k, v in response.headers.items()}))

        await asyncio.gather(*(client(n) for n in range(clients)))
    return results


def _stats(upstream: str) -> dict[str, Any]:
    return httpx.get(upstream + "/_stats").json()["keys"]


def test_concurrency_slots_hold_across_two_gateways(tmp_path: Path, redis_url: str, redis_sync: redis.Redis) -> None:
    limit = 5
    with mock_upstream() as upstream:
        config = write_config(tmp_path / "gw.yaml", _config(
            upstream, redis_url, {"requests": {"concurrency": limit}, "rpm": {"rate": "100000/1m"}}, ["requests", "rpm"]
        ))
        with gateway(config) as a, gateway(config) as b:
            results = asyncio.run(_hammer([a.url, b.url], HOT, "/hold?ms=150", clients=200, per_client=3))
            stats = _stats(upstream)
            metrics = httpx.get(a.admin_url + "/metrics").text + httpx.get(b.admin_url + "/metrics").text

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    hot = stats["hot"]
    # what the upstream saw: never more than the limit at once, and exactly the admitted requests
    assert hot["max_in_flight"] <= limit
    assert hot["max_in_flight"] == limit  # 200 clients at once did fill every slot
    assert hot["total"] == statuses[200] == hot["completed"]
    assert statuses[429] > 0
    for status, body, headers in results:
        assert int(headers["concurrency-limit"]) == limit
        if status == 429:
            assert body["error"] == "concurrency_limited" and body["success"] is False
            assert headers["retry-after"] == "1" and body["retryAfterSeconds"] == 1
            assert headers["concurrency-remaining"] == "0"
        else:
            assert 0 <= int(headers["concurrency-remaining"]) < limit
    assert "gateway_requests_total" in metrics
    assert_no_leaks(redis_sync, PREFIX)


def test_sliding_window_holds_across_two_gateways(tmp_path: Path, redis_url: str, redis_sync: redis.Redis) -> None:
    limit, window = 20, 2.0
    with mock_upstream() as upstream:
        config = write_config(tmp_path / "gw.yaml", _config(
            upstream, redis_url, {"burst": {"rate": f"{limit}/2s"}}, ["burst"]
        ))
        with gateway(config) as a, gateway(config) as b:
            started = time.monotonic()
            results: list[tuple[int, dict[str, Any], dict[str, str]]] = []
            while time.monotonic() - started < 5.0:  # bursts of 100 concurrent requests for ~5 s
                results += asyncio.run(_hammer([a.url, b.url], HOT, "/", clients=100, per_client=1))
            stats = _stats(upstream)

    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) == {200, 429}
    arrivals = stats["hot"]["arrivals"]
    assert len(arrivals) == statuses[200]
    # The gateway decides at admission; the upstream sees each request a little later, with
    # jitter. Exactness at the gateway means any `limit + 1` upstream arrivals span at least
    # the window, less that jitter.
    assert max_in_window(arrivals, window - 0.1) <= limit
    elapsed = max(arrivals) - min(arrivals)
    assert statuses[200] >= limit * int(elapsed // window)  # the budget was really used, not just refused
    assert statuses[200] <= limit * ((elapsed + 0.1) // window + 1)  # 0.1: admission-to-arrival jitter
    for status, body, headers in results:
        if status == 429:
            assert body["error"] == "rate_limited"
            retry = int(headers["retry-after"])
            assert retry == body["retryAfterSeconds"] and 1 <= retry <= window
            assert headers["x-ratelimit-remaining"] == "0"
    assert_no_leaks(redis_sync, PREFIX)


def test_rejections_consume_nothing(tmp_path: Path, redis_url: str, redis_sync: redis.Redis) -> None:
    """Hammering past the limit does not push the window: after one window, the key is served."""
    with mock_upstream() as upstream:
        config = write_config(tmp_path / "gw.yaml", _config(
            upstream, redis_url, {"burst": {"rate": "3/1s"}, "requests": {"concurrency": 2}}, ["burst", "requests"]
        ))
        with gateway(config) as a:
            first = asyncio.run(_hammer([a.url], HOT, "/", clients=1, per_client=3))
            assert [s for s, _, _ in first] == [200, 200, 200]
            refused = asyncio.run(_hammer([a.url], HOT, "/", clients=20, per_client=5))
            assert {s for s, _, _ in refused} == {429}
            time.sleep(1.05)
            again = asyncio.run(_hammer([a.url], HOT, "/", clients=1, per_client=3))
            assert [s for s, _, _ in again] == [200, 200, 200]
            # the other key was never affected
            other = asyncio.run(_hammer([a.url], COLD, "/", clients=1, per_client=3))
            assert [s for s, _, _ in other] == [200, 200, 200]
            stats = _stats(upstream)
    assert stats["hot"]["total"] == 6
    assert_no_leaks(redis_sync, PREFIX)


def test_back_to_back_requests_on_one_slot_are_never_refused(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    """A client that sends its next request as soon as the previous answer arrived finds its
    one slot free: the release travels ahead of the next admission, never behind it."""
    with mock_upstream() as upstream:
        config = write_config(tmp_path / "gw.yaml", _config(
            upstream, redis_url, {"requests": {"concurrency": 1}}, ["requests"]
        ))
        with gateway(config) as a, httpx.Client(headers={"X-API-Key": HOT}) as client:

            async def background_load() -> None:  # other keys keep the store's pipelines busy
                await _hammer([a.url], COLD, "/", clients=20, per_client=15)

            import threading

            noise = threading.Thread(target=lambda: asyncio.run(background_load()))
            noise.start()
            answers = [client.get(a.url + "/") for _ in range(300)]
            noise.join()
            statuses = Counter(answer.status_code for answer in answers)
            refused = [(answer.json(), dict(answer.headers)) for answer in answers if answer.status_code != 200]
    assert statuses == {200: 300}, refused
    assert_no_leaks(redis_sync, PREFIX)
