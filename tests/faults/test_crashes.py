"""Gateway processes that die, freeze or run on a wrong clock, sharing one healthy Redis.

- `kill -9` while holding slots: nobody releases them, the lease does: the other gateway
  admits again within `store.lease`, and counts the reclaimed slots.
- SIGSTOP past the lease: the frozen gateway's slots expire and are given to others, so the
  upstream briefly sees more than the limit; the excess is exactly the leases lost, which the
  resumed gateway counts (`gateway_leases_lost_total`); then everything is exact again.
- A gateway host clock 5 minutes ahead (libfaketime) changes nothing: time is Redis TIME.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.faults.conftest import LEASE, PREFIX, fault_config, gateway_for, get, upstream_stats
from tests.support.invariants import assert_no_leaks, max_in_window
from tests.support.load import Load, metric, run_load
from tests.support.processes import Proc
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

HOLDER = secret("crash-holder")  # 3 slots
RATED = secret("crash-rated")  # 10 per 2 s
SLOTS = 3


def crash_config(upstream: str, redis_url: str) -> dict[str, Any]:
    config = fault_config(upstream, redis_url, on_error="deny")
    config["keys"] = [
        {"id": "holder", "sha256": hash_key(HOLDER), "plan": "p"},
        {"id": "rated", "sha256": hash_key(RATED), "plan": "p"},
    ]
    config["plans"] = {"p": {"limits": {"burst": {"rate": "10/2s"}, "requests": {"concurrency": SLOTS}}}}
    config["routes"] = [{"path": "/hold", "limits": ["requests"]}, {"path": "/**", "limits": ["burst"]}]
    return config


def wait_for(condition: Callable[[], bool], what: str, within: float = 10.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            pytest.fail(f"{what} did not happen within {within}s")
        time.sleep(0.02)
    return time.monotonic() - started


@contextlib.contextmanager
def holds(gw: Proc, n: int) -> Iterator[list[socket.socket]]:
    """`n` requests held by the upstream (until POST /_release), on raw sockets kept open."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(f"GET /hold?ms=30000 HTTP/1.1\r\nHost: x\r\nX-API-Key: {HOLDER}\r\n\r\n".encode())
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def in_flight(upstream: str) -> int:
    return int(upstream_stats(upstream, "holder").get("in_flight", 0))


def hold_status(gw: Proc) -> int:
    """A short hold: 200 when a slot is free, 429 when not."""
    return get(gw, HOLDER, "/hold?ms=1").status_code


def test_killed_gateway_slots_come_back_within_the_lease(
    tmp_path: Path, fresh_upstream: str, redis_url: str, redis_sync: redis.Redis
) -> None:
    upstream = fresh_upstream
    config = crash_config(upstream, redis_url)
    with gateway_for(tmp_path, config, "a") as a, gateway_for(tmp_path, config, "b") as b:
        with holds(a, SLOTS):
            wait_for(lambda: in_flight(upstream) == SLOTS, "3 requests held through A")
            assert hold_status(b) == 429
            time.sleep(LEASE / 3 + 0.1)  # A's heartbeat has renewed them at least once
            a.process.kill()
            killed = time.monotonic()
            wait_for(lambda: in_flight(upstream) == 0, "the upstream seeing A's connections close")
            came_back = wait_for(lambda: hold_status(b) == 200, "a free slot", within=LEASE + 2)
        # Nobody released them: they expired. Never later than the lease after the kill, and
        # not much earlier than the lease minus one heartbeat interval.
        elapsed = time.monotonic() - killed
        assert LEASE * 2 / 3 - 0.2 < elapsed < LEASE + 0.5, elapsed
        for _ in range(SLOTS):
            assert hold_status(b) == 200  # all three are back
        assert metric(b.admin_url, "gateway_slots_reclaimed_total") == SLOTS
        assert upstream_stats(upstream, "holder")["disconnects"] == SLOTS
    print(f"\n[kill -9] slots back after {came_back:.2f}s (lease {LEASE}s)")
    assert_no_leaks(redis_sync, PREFIX)


def test_paused_gateway_over_admission_is_bounded_counted_and_healed(
    tmp_path: Path, fresh_upstream: str, redis_url: str, redis_sync: redis.Redis
) -> None:
    upstream = fresh_upstream
    config = crash_config(upstream, redis_url)
    with gateway_for(tmp_path, config, "a") as a, gateway_for(tmp_path, config, "b") as b:
        with holds(a, SLOTS):
            wait_for(lambda: in_flight(upstream) == SLOTS, "3 requests held through A")
            os.kill(a.process.pid, signal.SIGSTOP)
            try:
                # A is frozen past its lease: its slots expire and B may hand them out again.
                wait_for(lambda: hold_status(b) == 200, "A's slots expiring", within=LEASE + 2)
                with holds(b, SLOTS):
                    wait_for(lambda: in_flight(upstream) == 2 * SLOTS, "3 more requests held through B")
                    assert hold_status(b) == 429  # Redis holds B's 3: exact again for newcomers
                    os.kill(a.process.pid, signal.SIGCONT)
                    # A's heartbeat finds its 3 leases gone: counted, not silently renewed.
                    wait_for(lambda: metric(a.admin_url, "gateway_leases_lost_total") == SLOTS,
                             "A counting its lost leases", within=LEASE)
                    httpx.post(upstream + "/_release")
                    wait_for(lambda: in_flight(upstream) == 0, "every held request finishing")
            finally:
                os.kill(a.process.pid, signal.SIGCONT)
        lost = metric(a.admin_url, "gateway_leases_lost_total")
        # The bound: upstream concurrency <= limit + leases lost to the pause; counted exactly.
        assert upstream_stats(upstream, "holder")["max_in_flight"] == SLOTS + lost == 2 * SLOTS

        # Healed: a burst over both gateways gets exactly the limit again.
        httpx.post(upstream + "/_reset")
        statuses = asyncio.run(_burst([a.url, b.url], 10))
        assert statuses.count(200) >= SLOTS and upstream_stats(upstream, "holder")["max_in_flight"] == SLOTS
    assert_no_leaks(redis_sync, PREFIX)


async def _burst(urls: list[str], n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=10) as client:
        responses = await asyncio.gather(*(
            client.get(urls[i % len(urls)] + "/hold?ms=300", headers={"X-API-Key": HOLDER}) for i in range(n)
        ))
    return [response.status_code for response in responses]


FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)


def faketime_env(offset: str) -> dict[str, str]:
    """What `faketime` sets: the wall clock moved, monotonic time left alone."""
    library = next((path for path in FAKETIME_LIBS if os.path.exists(path)), None)
    if library is None:
        if os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1":
            pytest.fail("GATEWAY_REQUIRE_TOOLS=1 but libfaketime is not installed (Debian package faketime)")
        pytest.skip("libfaketime not installed (Debian package faketime)")
    return {"LD_PRELOAD": library, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def test_a_skewed_gateway_clock_changes_nothing(
    tmp_path: Path, fresh_upstream: str, redis_url: str, redis_sync: redis.Redis
) -> None:
    """One gateway 5 minutes ahead, one on time, sharing Redis: limits exact, headers sane."""
    upstream = fresh_upstream
    config = crash_config(upstream, redis_url)
    with gateway_for(tmp_path, config, "skewed", env=faketime_env("+300s")) as skewed, \
            gateway_for(tmp_path, config, "on-time") as on_time:
        assert get(skewed, RATED).status_code == 200
        wait_for(lambda: '{"time":' in skewed.log(), "the access log line")  # written after the answer
        logged = float(skewed.log().rsplit('{"time":', 1)[1].split(",", 1)[0])
        assert logged > time.time() + 250  # the skew is real: its access log is 5 minutes ahead

        async def scenario() -> tuple[Load, Load]:
            urls = [skewed.url, on_time.url]
            return await asyncio.gather(
                run_load(urls, RATED, clients=4, duration=2.5),
                run_load(urls, HOLDER, clients=8, duration=2.5, path="/hold?ms=100"),
            )

        rated, held = asyncio.run(scenario())
        ttls = [redis_sync.pttl(name) for name in redis_sync.scan_iter(match=f"{PREFIX}:*")]
    arrivals = upstream_stats(upstream, "rated")["arrivals"]
    assert max_in_window(arrivals, 2.0 - 0.1) <= 10
    assert len(arrivals) >= 10 * int((max(arrivals) - min(arrivals)) // 2.0)  # the budget was used
    assert upstream_stats(upstream, "holder")["max_in_flight"] == SLOTS
    assert set(rated.statuses()) == {200, 429} and set(held.statuses()) == {200, 429}
    retry_after = {int(s.retry_after) for s in rated.samples if s.retry_after is not None}
    assert retry_after and retry_after <= {1, 2}  # from both gateways: Redis time, not theirs
    assert ttls and all(0 < ttl <= 3 * LEASE * 1000 + 2000 for ttl in ttls), ttls
    assert_no_leaks(redis_sync, PREFIX)
