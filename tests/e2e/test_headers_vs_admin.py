"""The limit headers never contradict the store: a real gateway process under concurrent load,
its answers' concurrency numbers against the admin view (`GET /v1/keys/{id}`) of the same
store, on the memory store and on Redis.

- Under load, every answer's numbers add up (Current + Remaining = Limit), an admitted request
  counts itself (1..N), a concurrency refusal says N, and the admin view never shows more.
- With slots held still, a rate refusal says exactly what the admin view says (a refused
  request holds no slot), or, answered from the refusal cache, says nothing about the slots.
- IETF `w` is whole seconds (a 1500 ms window is announced as 2).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admission.identity import hash_key
from tests.support.processes import Proc, gateway, mock_upstream, wait_until_in_flight, write_config
from tests.support.secrets import secret

pytestmark = pytest.mark.e2e

LOADED = secret("headers-admin-loaded")
RATED = secret("headers-admin-rated")
SUBSECOND = secret("headers-admin-subsecond")
SLOTS = 3


def config(upstream: str, store_url: str) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream, "timeout": "10s"},
        "store": {"url": store_url, "prefix": "gwhva"},
        "keys": [
            {"id": "loaded", "sha256": hash_key(LOADED), "plan": "busy"},
            {"id": "rated", "sha256": hash_key(RATED), "plan": "scarce"},
            {"id": "subsecond", "sha256": hash_key(SUBSECOND), "plan": "fast"},
        ],
        "plans": {
            "busy": {"limits": {"rpm": {"rate": "10000/1m"}, "requests": {"concurrency": SLOTS}}},
            "scarce": {"limits": {"rpm": {"rate": "4/1h"}, "requests": {"concurrency": SLOTS}}},
            "fast": {"limits": {"rps": {"rate": "5/1500ms"}, "requests": {"concurrency": SLOTS}}},
        },
        "routes": [{"path": "/**", "limits": ["rpm", "rps", "requests"]}],
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
def gw(request: pytest.FixtureRequest, tmp_path: Path, upstream: str) -> Iterator[Proc]:
    store_url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    httpx.post(upstream + "/_reset")
    with gateway(write_config(tmp_path / "gw.yaml", config(upstream, store_url))) as proc:
        yield proc


def in_use(gw: Proc, key_id: str) -> int:
    view = httpx.get(f"{gw.admin_url}/v1/keys/{key_id}").json()
    (slots,) = [bucket for bucket in view["buckets"] if bucket["kind"] == "concurrency"]
    return int(slots["in_use"])


def concurrency_numbers(response: httpx.Response) -> tuple[int, int, int] | None:
    """(limit, current, remaining), checked against each other, or None when none are sent."""
    names = ("concurrency-limit", "concurrency-remaining", "x-concurrent-limit", "x-concurrent-current",
             "x-concurrent-remaining")
    present = [name for name in names if name in response.headers]
    if not present:
        return None
    assert present == list(names), f"a partial concurrency header set: {present}"
    h = response.headers
    assert h["concurrency-limit"] == h["x-concurrent-limit"]
    assert h["concurrency-remaining"] == h["x-concurrent-remaining"]
    limit, current, remaining = int(h["x-concurrent-limit"]), int(h["x-concurrent-current"]), int(
        h["x-concurrent-remaining"])
    assert current + remaining == limit
    return limit, current, remaining


def test_headers_under_load_never_exceed_what_the_store_holds(gw: Proc) -> None:
    samples: list[int] = []
    stop = threading.Event()

    def watch_admin() -> None:
        while not stop.is_set():
            samples.append(in_use(gw, "loaded"))

    def one(_: int) -> httpx.Response:
        return httpx.get(gw.url + "/hold?ms=150", headers={"X-API-Key": LOADED}, timeout=20)

    watcher = threading.Thread(target=watch_admin)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(48)))
    finally:
        stop.set()
        watcher.join()

    refused = 0
    for answer in answers:
        numbers = concurrency_numbers(answer)
        assert numbers is not None
        limit, current, _ = numbers
        assert limit == SLOTS
        if answer.status_code == 200:
            assert 1 <= current <= SLOTS  # itself counted, never above the limit
        else:
            assert answer.status_code == 429 and answer.json()["error"] == "concurrency_limited"
            assert current == SLOTS  # all held by others; this one holds nothing
            refused += 1
    assert refused > 0, "8 clients on 3 slots never met a concurrency refusal: no load"
    assert samples and max(samples) <= SLOTS and max(samples) >= 1
    assert in_use(gw, "loaded") == 0  # everything finished: nothing held


def test_a_rate_refusal_says_what_the_admin_view_says(gw: Proc, upstream: str) -> None:
    headers = {"X-API-Key": RATED}
    held = 2
    with ThreadPoolExecutor(held) as holders:
        slow = [holders.submit(httpx.get, gw.url + "/hold?ms=4000", headers=headers, timeout=20)
                for _ in range(held)]
        wait_until_in_flight(upstream, "rated", held)
        for _ in range(4 - held):  # spend the rest of the 4/1h budget
            assert httpx.get(gw.url + "/", headers=headers).status_code == 200
        assert in_use(gw, "rated") == held

        with ThreadPoolExecutor(6) as pool:
            refusals = list(pool.map(lambda _: httpx.get(gw.url + "/", headers=headers), range(6)))
        assert in_use(gw, "rated") == held  # still: the holders have seconds to go
        told = []
        for refusal in refusals:
            assert refusal.status_code == 429 and refusal.json()["error"] == "rate_limited"
            numbers = concurrency_numbers(refusal)
            if numbers is not None:  # from the store; a cached refusal says nothing of the slots
                told.append(numbers)
        assert told, "no refusal came from the store"
        assert all(numbers == (SLOTS, held, SLOTS - held) for numbers in told), told
        for future in slow:
            assert future.result().status_code == 200

    assert in_use(gw, "rated") == 0
    later = httpx.get(gw.url + "/", headers=headers)  # refused from the cache, long after its store call
    assert later.status_code == 429 and concurrency_numbers(later) is None
    assert '"requests"' not in later.headers["ratelimit"] and '"rpm";r=0;t=' in later.headers["ratelimit"]


def test_ietf_window_is_whole_seconds(gw: Proc) -> None:
    answer = httpx.get(gw.url + "/", headers={"X-API-Key": SUBSECOND})
    assert answer.status_code == 200
    assert answer.headers["ratelimit-policy"] == '"rps";q=5;w=2, "requests";q=3;qu="concurrent-requests"'
