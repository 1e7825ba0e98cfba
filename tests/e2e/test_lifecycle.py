"""Operating a real gateway process: graceful shutdown, hot reload, workers, metric cardinality."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.invariants import assert_no_leaks
from tests.support.processes import Proc, gateway, mock_upstream, wait_until_in_flight, write_config
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


def waiting_config(upstream: str, store: str, slots: int, wait: str, **extra: Any) -> dict[str, Any]:
    cfg = config(upstream, store, slots=slots, **extra)
    cfg["plans"]["p"]["limits"]["requests"]["wait"] = wait
    return cfg


def queued(client: redis.Redis) -> int:
    """Waiters queued in Redis under the test's prefix."""
    return sum(int(client.zcard(key)) for key in client.scan_iter(match=f"{PREFIX}:*:q"))


def wait_until_queued(client: redis.Redis, count: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while queued(client) < count:
        assert time.monotonic() < deadline, f"{count} waiters never queued"
        time.sleep(0.02)


def access_lines(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith('{"time"')]


def assert_nothing_crashed(proc: Proc) -> None:
    log = proc.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert all(line["outcome"] != "error" for line in access_lines(proc)), log[-3000:]


@pytest.mark.redis
def test_sigterm_drain_waits_for_requests_still_waiting_for_a_slot(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    """Requests waiting for a slot (held by another replica) are in progress too: the drain
    waits for them within the grace and they are served. Before, a worker with nothing admitted
    stopped at once, and its waiters got a plain-text 500 and a traceback each."""
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", waiting_config(upstream, redis_url, 2, "10s", shutdown_grace="8s"))
        with gateway(path) as other, gateway(path) as gw, concurrent.futures.ThreadPoolExecutor(6) as pool:
            holds = [pool.submit(get, other, "/hold?ms=2500") for _ in range(2)]
            wait_until_in_flight(upstream, "k", 2)
            waiters = [pool.submit(get, gw, "/hold?ms=200") for _ in range(3)]
            wait_until_queued(redis_sync, 3)
            signalled = time.monotonic()
            gw.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = get(gw, "/")
            assert refused.status_code == 503 and refused.json()["error"] == "shutting_down"
            assert [w.result().status_code for w in waiters] == [200, 200, 200]
            assert gw.process.wait(15) == 0
            assert time.monotonic() - signalled > 1.5  # it waited for the other replica's slots
            assert [h.result().status_code for h in holds] == [200, 200]
        assert "draining: 3 request(s) in progress (0 admitted)" in gw.log()
        assert_nothing_crashed(gw)
        assert [line["outcome"] for line in access_lines(gw) if line["path"] == "/hold"] == ["admitted"] * 3
    assert_no_leaks(redis_sync, PREFIX)


def test_sigterm_drain_waits_for_an_upload_not_yet_admitted(tmp_path: Path) -> None:
    """A request whose body is still arriving (not admitted yet: the body comes first) is in
    progress: before, it was cut after about a second with a 500."""
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", config(upstream, shutdown_grace="8s"))
        with gateway(path) as gw, socket.create_connection(("127.0.0.1", gw.port), timeout=15) as sock:
            total = 20_000
            sock.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: {SECRET}\r\n"
                         f"Content-Length: {total}\r\n\r\n".encode() + b"a" * 1000)
            time.sleep(0.3)
            gw.send_signal(signal.SIGTERM)
            for _ in range(total // 1000 - 1):  # 2 s more, well past uvicorn's own 1 s timeout
                time.sleep(0.1)
                sock.sendall(b"a" * 1000)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), answer
            assert json.loads(body)["bytes"] == total
            assert gw.process.wait(10) == 0
        assert_nothing_crashed(gw)


@pytest.mark.redis
def test_grace_exceeded_answers_503_cuts_streams_and_still_releases(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    """What is unanswered when shutdown_grace ends gets the gateway's JSON 503 shutting_down
    (admitted and waiting for its upstream, or still waiting for a slot); a response already
    streaming is cut, never made to look complete. No 500, no traceback, nothing left held.
    Before, uvicorn's cancellation answered a plain-text 500 and logged a traceback each."""
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gw.yaml", waiting_config(upstream, redis_url, 2, "20s", shutdown_grace="1s"))
        with gateway(path) as gw, concurrent.futures.ThreadPoolExecutor(4) as pool:

            def stream() -> tuple[int, type[Exception] | None]:
                with httpx.stream("GET", gw.url + "/download?bytes=2000000&ms=200",
                                  headers={"X-API-Key": SECRET}, timeout=30) as response:
                    try:
                        for _ in response.iter_raw():
                            pass
                    except httpx.HTTPError as exc:
                        return response.status_code, type(exc)
                    return response.status_code, None

            streaming = pool.submit(stream)
            held = pool.submit(get, gw, "/hold?ms=20000")
            wait_until_in_flight(upstream, "k", 2)
            waiter = pool.submit(get, gw, "/hold?ms=10")
            wait_until_queued(redis_sync, 1)
            signalled = time.monotonic()
            gw.send_signal(signal.SIGTERM)
            assert gw.process.wait(10) == 0
            assert time.monotonic() - signalled < 4
            for response in (held.result(), waiter.result()):
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "shutting_down" and response.headers["retry-after"] == "1"
            status, error = streaming.result()
            assert status == 200 and error is not None  # cut mid-body: never a clean end
        assert_nothing_crashed(gw)
        ends = sorted((line["path"], line["status"], line["outcome"]) for line in access_lines(gw))
        assert ends == [("/download", 200, "shutting_down"), ("/hold", 503, "shutting_down"),
                        ("/hold", 503, "shutting_down")]
        # the leases were released at once, not left to expire (lease is 5 s); the queue is empty
        assert_no_leaks(redis_sync, PREFIX)
        assert queued(redis_sync) == 0


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
            # read once it has stayed unchanged for 2 s (gateway/reload.py, SETTLE), polled each second
            deadline = time.monotonic() + 10
            while not metric_value(httpx.get(gw.admin_url + "/metrics").text, "gateway_config_reloads_total",
                                   result="error"):
                assert time.monotonic() < deadline, gw.log()
                time.sleep(0.1)
            metrics = httpx.get(gw.admin_url + "/metrics").text
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
