"""Fixtures for the fault tests: a private redis-server behind a fault proxy, the mock upstream,
gateway configs with short budgets (store timeout 150 ms, lease 2 s), and small probes.

Private servers are stopped by their own PID only; the shared Redis is never paused, killed,
flushed or reconfigured here (tests that only need a healthy Redis use the `redis_url` fixture).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.support.fault_proxy import FaultProxy
from tests.support.invariants import assert_no_leaks_within
from tests.support.processes import Proc, gateway, mock_upstream, write_config
from tests.support.redis_server import PrivateRedis, private_redis
from tests.support.secrets import secret

STORE_TIMEOUT = 0.15
LEASE = 2.0
COOLDOWN = 1.0  # the circuit breaker's (gateway/admission/breaker.py)
SLACK = 0.5  # scheduling noise on a busy 2-core machine, for client-side timings
PREFIX = "gwfault"

BIG_KEY = secret("faults-big")  # limits that never refuse: every request exercises the store
SMALL_KEY = secret("faults-small")  # rate 6/10s, 2 slots: refusals are predictable


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    """A private redis-server for one test (replay tests cut its connections)."""
    with private_redis() as started:
        yield started


@pytest.fixture
def proxy(server: PrivateRedis) -> Iterator[FaultProxy]:
    """`server` behind a fault proxy that can cut a connection after an EVALSHA or ZREM ran."""
    with FaultProxy(server.port, markers=(b"EVALSHA", b"ZREM")) as started:
        yield started


def fault_config(upstream: str, store_url: str, *, on_error: str = "local", **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstream": {"url": upstream, "timeout": "5s", "max_connections": 64},
        "store": {"url": store_url, "prefix": PREFIX, "timeout": f"{int(STORE_TIMEOUT * 1000)}ms",
                  "lease": f"{int(LEASE)}s", "on_error": on_error},
        "client_timeout": "5s",
        "keys": [
            {"id": "big", "sha256": hash_key(BIG_KEY), "plan": "big"},
            {"id": "small", "sha256": hash_key(SMALL_KEY), "plan": "small"},
        ],
        "plans": {
            "big": {"limits": {"rpm": {"rate": "100000/1m"}, "requests": {"concurrency": 50}}},
            "small": {"limits": {"rpm": {"rate": "6/10s"}, "requests": {"concurrency": 2}}},
        },
        "routes": [{"path": "/**", "limits": ["rpm", "requests"]}],
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


@pytest.fixture
def fresh_upstream(upstream: str) -> str:
    httpx.post(upstream + "/_reset")
    return upstream


def upstream_stats(upstream: str, key: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(upstream + "/_stats").json()["keys"].get(key, {})
    return stats


@dataclass
class FaultyRedis:
    """A private redis-server (restartable on its port) behind a fault proxy."""

    server: PrivateRedis
    proxy: FaultProxy
    stack: contextlib.ExitStack

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.proxy.port}/0"

    def client(self) -> redis.Redis:
        """Straight to the server, past the proxy."""
        return redis.Redis(port=self.server.port, socket_timeout=2)

    def evalsha_calls(self) -> int:
        with self.client() as direct:
            stats: dict[str, Any] = direct.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    def kill(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        """A new, empty redis-server on the same port (what a crash and restart look like)."""
        self.server = self.stack.enter_context(private_redis(port=self.server.port))

    def freeze(self) -> None:
        os.kill(self.server.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.server.process.pid, signal.SIGCONT)

    def assert_no_leaks(self, within: float = 2.0) -> None:
        """Every slot set empty and every key with a TTL (releases are batched: allow a moment)."""
        with self.client() as direct:
            assert_no_leaks_within(direct, PREFIX, within)


@pytest.fixture
def faulty_redis() -> Iterator[FaultyRedis]:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(private_redis())
        proxy = stack.enter_context(FaultProxy(server.port))
        faulty = FaultyRedis(server, proxy, stack)
        try:
            yield faulty
        finally:
            if faulty.server.process.poll() is None:
                faulty.thaw()  # never leave a stopped process behind


@contextlib.contextmanager
def gateway_for(tmp_path: Path, config: dict[str, Any], name: str = "gw", **kwargs: Any) -> Iterator[Proc]:
    """A gateway process whose log must show no traceback once it has stopped (nothing crashed)."""
    with gateway(write_config(tmp_path / f"{name}.yaml", config), **kwargs) as proc:
        yield proc
    log = proc.log()
    assert "Traceback" not in log, log[-3000:]


def get(proc: Proc, key: str, path: str = "/", timeout: float = 10) -> httpx.Response:
    return httpx.get(proc.url + path, headers={"X-API-Key": key}, timeout=timeout)


def timed_get(proc: Proc, key: str, path: str = "/") -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = get(proc, key, path)
    return response, time.monotonic() - started


def readyz(proc: Proc, strict: bool = False) -> tuple[int, dict[str, Any]]:
    response = httpx.get(proc.admin_url + "/readyz" + ("?strict" if strict else ""), timeout=5)
    return response.status_code, response.json()
