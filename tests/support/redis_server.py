"""Real redis-server access for tests: the shared local one, or private ones for fault tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

SHARED_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_REDIS = os.environ.get("GATEWAY_REQUIRE_REDIS") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_redis_reachable() -> bool:
    try:
        client = redis.Redis.from_url(SHARED_URL, socket_timeout=1, socket_connect_timeout=1)
        client.ping()
        client.close()
        return True
    except redis.RedisError:
        return False


@dataclass
class PrivateRedis:
    """A redis-server process this test run started and owns (stop it by its PID only)."""

    port: int
    process: subprocess.Popen[bytes]
    workdir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@contextmanager
def private_redis(*extra_args: str, port: int | None = None) -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        import pytest

        if REQUIRE_REDIS:
            pytest.fail("redis-server binary not found but GATEWAY_REQUIRE_REDIS=1")
        pytest.skip("redis-server binary not found")
    workdir = tempfile.mkdtemp(prefix="gw-redis-")
    port = port or free_port()
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", workdir, "--enable-debug-command", "local", "--maxmemory-policy", "noeviction",
        *extra_args,
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = PrivateRedis(port, process, workdir)
    deadline = time.monotonic() + 10
    while True:
        try:
            server.client().ping()
            break
        except redis.RedisError:
            if time.monotonic() > deadline or process.poll() is not None:
                server.stop()
                raise RuntimeError(f"redis-server on port {port} did not start") from None
            time.sleep(0.05)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
