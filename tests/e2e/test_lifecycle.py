"""Operating a real gateway process: graceful shutdown, hot reload, workers, metric cardinality."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.invariants import assert_no_leaks
from tests.support.processes import Proc, gateway, mock_upstream, write_config
from tests.support.secrets import secret

pytestmark = pytest.mark.e2e

SECRET = secret("lifecycle")
PREFIX = "gwlife"


def config(upstream: str, store: str = "memory://", rate: str = "1000/1m", slots: int = 10,
           **extra: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream, "timeout": "20s"},
        "store": {"url": store, "prefix": PREFIX, "lease": "5s"},
        "keys": [{"id": "k", "sha256": hash_key(SECRET), "plan": "p"}],
        "plans": {"p": {"limits": {"rpm": {"rate": rate}, "requests": {"concurrency": slots}}}},
        "routes": [{"path": "/**", "limits": ["rpm", "requests"]}],
        **extra,
    }


def get(proc: Proc, path: str = "/", timeout: float = 30) -> httpx.Response:
    return httpx.get(proc.url + path, headers={"X-API-Key": SECRET}, timeout=timeout)


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.redis
def test_sigterm_drains_in_flight_requests_and_releases_slots(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, redis_url, shutdown_grace="10s"))
        with gateway(path) as gw, concurrent.futures.ThreadPoolExecutor(4) as pool:
            holds = [pool.submit(get, gw, "/hold?ms=1500") for _ in range(3)]
            time.sleep(0.5)  # all three admitted and held upstream
            assert redis_sync.zcard(next(redis_sync.scan_iter(f"{PREFIX}:*:c:requests"))) == 3
            signalled = time.monotonic()
            gw.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready = httpx.get(gw.admin_url + "/readyz")
            assert ready.status_code == 503
            refused = get(gw, "/")
            assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
            assert [h.result().status_code for h in holds] == [200, 200, 200]  # in flight finished
            assert gw.process.wait(15) == 0
            assert time.monotonic() - signalled < 5
    assert_no_leaks(redis_sync, PREFIX)


@pytest.mark.redis
def test_grace_exceeded_cuts_requests_and_still_releases(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, redis_url, shutdown_grace="500ms"))
        with gateway(path) as gw, concurrent.futures.ThreadPoolExecutor(4) as pool:
            holds = [pool.submit(get, gw, "/hold?ms=20000") for _ in range(2)]
            time.sleep(0.5)
            gw.send_signal(signal.SIGTERM)
            assert gw.process.wait(10) == 0
            for hold in holds:  # cut: an error or an incomplete answer, never a clean 200
                try:
                    response = hold.result()
                except httpx.HTTPError:
                    continue
                assert response.status_code != 200, response
            # the leases were released at once, not left to expire (lease is 5 s)
            assert_no_leaks(redis_sync, PREFIX)


def test_reload_on_file_change_keeps_counters(tmp_path: Path) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, rate="2/1m"))
        with gateway(path) as gw:
            assert [get(gw).status_code for _ in range(3)] == [200, 200, 429]
            write_config(path, config(upstream, rate="5/1m"))
            deadline = time.monotonic() + 10
            while get(gw).status_code == 429:  # the watcher reloads within about a second
                assert time.monotonic() < deadline, gw.log()
                time.sleep(0.1)
            # the request just admitted was the 3rd of the window: counters were not reset
            assert [get(gw).status_code for _ in range(3)] == [200, 200, 429]
            assert get(gw).headers["x-ratelimit-limit"] == "5"

            (tmp_path / "gw.yaml").write_text("upstream: {url: 42}\nbogus: true\n")
            time.sleep(2.5)
            metrics = httpx.get(gw.admin_url + "/metrics").text
            assert metric_value(metrics, "gateway_config_reloads_total", result="error") >= 1
            assert metric_value(metrics, "gateway_config_reloads_total", result="success") >= 1
            response = get(gw)  # still serving with the last good config
            assert response.status_code == 429 and response.headers["x-ratelimit-limit"] == "5"
            assert "reload refused" in gw.log()


def test_reload_keeps_requests_in_flight(tmp_path: Path) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, rate="100/1m"))
        with gateway(path) as gw, concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = pool.submit(get, gw, "/hold?ms=2000")
            time.sleep(0.3)
            write_config(path, config(upstream, rate="50/1m"))
            gw.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while get(gw).headers["x-ratelimit-limit"] != "50":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            response = held.result()  # started under the old config, finished after the reload
            assert response.status_code == 200 and response.json() == {"held": True}


def test_sighup_reloads(tmp_path: Path) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, rate="1/1m"))
        with gateway(path) as gw:
            assert [get(gw).status_code for _ in range(2)] == [200, 429]
            # rewrite with the same size and mtime is unlikely; SIGHUP forces the reload anyway
            write_config(path, config(upstream, rate="9/1m"))
            gw.send_signal(signal.SIGHUP)
            # The reload parses in a child process: poll (bounded) rather than guess its time.
            deadline = time.monotonic() + 10
            while get(gw).headers.get("x-ratelimit-limit") != "9" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert get(gw).headers["x-ratelimit-limit"] == "9"


@pytest.mark.redis
def test_two_workers_share_limits_and_aggregate_metrics(tmp_path: Path, redis_url: str) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, redis_url, rate="30/1m", slots=100))
        with gateway(path, workers=2) as gw:

            async def burst() -> list[int]:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                    async def one() -> int:
                        async with session.get(gw.url + "/", headers={"X-API-Key": SECRET}) as r:
                            return r.status
                    return await asyncio.gather(*(one() for _ in range(60)))

            statuses = asyncio.run(burst())
            assert statuses.count(200) == 30 and statuses.count(429) == 30
            pids = {httpx.get(upstream + "/_stats").json()["keys"]["k"]["total"]}
            assert pids == {30}
            # any worker answers /metrics with the sum of all workers' counters
            for _ in range(5):
                text = httpx.get(gw.admin_url + "/metrics", headers={"Connection": "close"}).text
                assert metric_value(text, "gateway_requests_total", outcome="admitted") == 30
                assert metric_value(text, "gateway_requests_total", outcome="rate_limited") == 30
            assert gw.stop() == 0


def test_metric_series_stay_bounded(tmp_path: Path) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream))
        with gateway(path) as gw:

            async def noise(n: int) -> None:
                rng = random.Random(n)
                async with aiohttp.ClientSession() as session:
                    for i in range(n):
                        key = SECRET if i % 3 == 0 else f"random-{rng.random()}"
                        url = f"{gw.url}/p{rng.randrange(10**9)}?apikey={key}"
                        headers = {"X-Forwarded-For": f"10.{rng.randrange(256)}.{rng.randrange(256)}.1"}
                        async with session.get(url, headers=headers) as response:
                            await response.read()

            def series() -> int:
                text = httpx.get(gw.admin_url + "/metrics").text
                return len([line for line in text.splitlines() if re.match(r"gateway_\w+\{", line)])

            asyncio.run(noise(30))
            before = series()
            asyncio.run(noise(2000))
            after = series()
            text = httpx.get(gw.admin_url + "/metrics").text
    assert after == before
    assert "random-" not in text and SECRET not in text
    assert not re.search(r"10\.\d+\.\d+\.1", text)


def workers_of(proc: Proc) -> list[str]:
    """Worker pids of a `--workers N` gateway (multiprocessing's resource tracker excluded)."""
    children = Path(f"/proc/{proc.process.pid}/task/{proc.process.pid}/children").read_text().split()
    return [pid for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.redis
@pytest.mark.leaves_slots  # the killed worker's leases expire by themselves (lease 5 s)
def test_a_crashed_worker_is_replaced_and_its_gauges_vanish(tmp_path: Path, redis_url: str) -> None:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, redis_url, slots=100))
        with gateway(path, workers=2) as gw, concurrent.futures.ThreadPoolExecutor(8) as pool:
            children = workers_of(gw)
            holds = [pool.submit(get, gw, "/hold?ms=3000") for _ in range(8)]
            time.sleep(0.8)
            text = httpx.get(gw.admin_url + "/metrics").text
            assert metric_value(text, "gateway_in_flight_requests") == 8
            victim = int(children[0])
            os.kill(victim, signal.SIGKILL)
            for hold in holds:
                try:
                    hold.result()
                except httpx.HTTPError:
                    pass
            deadline = time.monotonic() + 10
            while True:  # a new worker replaces it and the dead one's gauge is gone from the sum
                now_children = workers_of(gw)
                text = httpx.get(gw.admin_url + "/metrics").text
                if len(now_children) == 2 and str(victim) not in now_children and \
                        metric_value(text, "gateway_in_flight_requests") == 0:
                    break
                assert time.monotonic() < deadline, (now_children, metric_value(text, "gateway_in_flight_requests"))
                time.sleep(0.2)
            assert get(gw).status_code == 200
            assert gw.stop() == 0
