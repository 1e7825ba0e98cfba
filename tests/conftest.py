"""Shared fixtures. Real-Redis tests skip when no Redis is reachable, except under
GATEWAY_REQUIRE_REDIS=1 (set by .ci/run), where a missing Redis fails the run instead."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.redis_server import REQUIRE_REDIS, SHARED_URL, shared_redis_reachable

_reachable: bool | None = None


def _require_redis() -> None:
    global _reachable
    if _reachable is None:
        _reachable = shared_redis_reachable()
    if not _reachable:
        if REQUIRE_REDIS:
            pytest.fail(f"GATEWAY_REQUIRE_REDIS=1 but no Redis answers at {SHARED_URL}")
        pytest.skip(f"no Redis at {SHARED_URL}")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """URL of a real, flushed Redis database (the shared local server, db 15)."""
    _require_redis()
    client = redis.Redis.from_url(SHARED_URL)
    client.flushdb()
    try:
        yield SHARED_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
