"""A config reload while requests wait for a slot: the waiters follow the new config.

Found probing: a waiter kept the plan it arrived with. A raised limit admitted newcomers at once
while the waiters waited on and got a 429 saying the old limit; a lowered one let the waiters in
by the old number, past the new one; a removed key's waiters were still admitted and forwarded.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admission.identity import hash_key
from tests.support.invariants import assert_no_leaks
from tests.support.processes import Proc, gateway, mock_upstream, write_config

pytestmark = pytest.mark.e2e

SECRET = "reload-waiter-secret-1"
PREFIX = "gwwaitreload"
HEADERS = {"X-API-Key": SECRET}


def config(upstream: str, store: str, concurrency: int, *, with_key: bool = True) -> dict[str, Any]:
    keys = [{"id": "w", "sha256": hash_key(SECRET), "plan": "p"}] if with_key else []
    keys.append({"id": "other", "sha256": hash_key("another-key-secret-1"), "plan": "p"})
    return {
        "upstream": {"url": upstream, "timeout": "20s"},
        "store": {"url": store, "prefix": PREFIX, "timeout": "500ms", "lease": "5s", "on_error": "deny"},
        "keys": keys,
        "plans": {"p": {"limits": {"requests": {"concurrency": concurrency, "wait": "8s"}}}},
        "routes": [{"path": "/**", "limits": ["requests"]}],
    }


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


class Running:
    def __init__(self, proc: Proc, path: Path, upstream: str, store: str) -> None:
        self.proc, self.path, self.upstream, self.store = proc, path, upstream, store
        self.pool = ThreadPoolExecutor(8)

    def get(self, target: str) -> Future[httpx.Response]:
        return self.pool.submit(httpx.get, self.proc.url + target, headers=HEADERS, timeout=30)

    def reload(self, concurrency: int, *, with_key: bool = True) -> None:
        before = self._reloads()
        write_config(self.path, config(self.upstream, self.store, concurrency, with_key=with_key))
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self._reloads() == before:
            assert time.monotonic() < deadline, "the reload never happened"
            time.sleep(0.05)

    def _reloads(self) -> float:
        text = httpx.get(self.proc.admin_url + "/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('gateway_config_reloads_total{result="success"}'))

    def arrivals(self) -> int:
        return int(httpx.get(self.upstream + "/_stats").json()["keys"].get("w", {}).get("total", 0))


@pytest.fixture
def running(tmp_path: Path, store_url: str) -> Iterator[Running]:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, store_url, 1))
        with gateway(path) as proc:
            setup = Running(proc, path, upstream, store_url)
            yield setup
            httpx.post(upstream + "/_release")
            setup.pool.shutdown(wait=True)
        if store_url.startswith("redis"):
            import redis

            with redis.Redis.from_url(store_url) as client:
                assert_no_leaks(client, PREFIX)


def _queued(running: Running, future: Future[httpx.Response]) -> None:
    time.sleep(0.4)
    assert not future.done(), "the waiter was answered before the reload"


def test_a_raised_limit_admits_the_waiter_at_once_with_the_new_headers(running: Running) -> None:
    holder = running.get("/hold?ms=15000")
    time.sleep(0.3)
    waiter = running.get("/echo")
    _queued(running, waiter)
    running.reload(3)
    started = time.monotonic()
    answer = waiter.result(timeout=5)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - started < 2.0  # its next check, not the end of its wait (8 s)
    assert answer.headers["Concurrency-Limit"] == "3"
    assert not holder.done()


def test_a_lowered_limit_holds_the_waiter_to_the_new_number(running: Running) -> None:
    running.reload(3)
    short = running.get("/hold?ms=1500")
    long = [running.get("/hold?ms=4000") for _ in range(2)]
    time.sleep(0.3)
    waiter = running.get("/echo")
    _queued(running, waiter)
    running.reload(1)
    short.result(timeout=5)
    time.sleep(0.8)  # a slot of the old limit (3) is free, none of the new (1): 2 held
    assert not waiter.done(), "admitted by the old limit after the reload lowered it"
    for holder in long:
        assert holder.result(timeout=10).status_code == 200
    answer = waiter.result(timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Concurrency-Limit"] == "1"


def test_a_removed_keys_waiter_gets_401_and_never_reaches_the_upstream(running: Running) -> None:
    holder = running.get("/hold?ms=15000")
    time.sleep(0.3)
    waiter = running.get("/echo")
    _queued(running, waiter)
    running.reload(1, with_key=False)
    answer = waiter.result(timeout=5)
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_api_key", answer.text
    assert running.arrivals() == 1  # the holder only
    assert not holder.done()
