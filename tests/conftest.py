"""Shared fixtures. Real-Redis tests skip when no Redis is reachable, except under
GATEWAY_REQUIRE_REDIS=1 (set by .ci/run), where a missing Redis fails the run instead."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support import processes
from tests.support.redis_server import REQUIRE_REDIS, SHARED_URL, shared_redis_reachable

_reachable: bool | None = None


@pytest.fixture(scope="session", autouse=True)
def _process_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Logs of shared helper processes (mock upstreams) go under pytest's temporary directory."""
    processes.LOG_DIR = tmp_path_factory.mktemp("process-logs")


def _require_redis() -> None:
    global _reachable
    if _reachable is None:
        _reachable = shared_redis_reachable()
    if not _reachable:
        if REQUIRE_REDIS:
            pytest.fail(f"GATEWAY_REQUIRE_REDIS=1 but no Redis answers at {SHARED_URL}")
        pytest.skip(f"no Redis at {SHARED_URL}")


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a real, flushed Redis database (the shared local server, db 15).

    After the test, whatever it did, every key left must have a TTL and every concurrency
    slot set (`:c:` in its name) must be empty, unless the test is marked `leaves_slots`
    (a crashed holder's leases legitimately wait for their expiry)."""
    _require_redis()
    client = redis.Redis.from_url(SHARED_URL)
    client.flushdb()
    try:
        yield SHARED_URL
        problems = []
        for name in client.scan_iter(count=1000):
            ttl = client.pttl(name)
            if ttl == -1:
                problems.append(f"{name!r} has no TTL")
            if b":c:" in name and client.type(name) == b"zset" and client.zcard(name) > 0:
                if request.node.get_closest_marker("leaves_slots") is None:
                    problems.append(f"slot set {name!r} still holds {client.zrange(name, 0, -1)!r}")
        assert not problems, "after the test: " + "; ".join(problems)
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
