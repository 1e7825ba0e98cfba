"""Store fixtures: one table of backends (memory, fakeredis, real Redis), a driven clock,
a recording observer, and a teardown that proves no Redis key is left without a TTL and no
slot set is left holding a lease."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aredis

from gateway.store.base import RateBucket, SlotBucket
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("fakeredis", id="fakeredis"),
    # Real Redis through the store's own pipelined connection (what `redis://` URLs use)...
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    # ...and through redis-py pipelines (what TLS, Sentinel and Cluster URLs use).
    pytest.param("redis-py", id="redis-py", marks=pytest.mark.redis),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's asyncio client is asyncio-only


class DrivenClock:
    """Seconds, as the stores expect, kept as whole milliseconds so no float drift moves
    a decision across a window boundary."""

    def __init__(self, start_ms: int = 1_000_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> float:
        return self.ms / 1000

    def advance_ms(self, ms: int) -> None:
        self.ms += ms


@dataclass
class RecordingObserver:
    reclaimed: int = 0
    lost: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def slots_reclaimed(self, count: int) -> None:
        self.reclaimed += count

    def leases_lost(self, count: int) -> None:
        self.lost += count

    def store_error(self, operation: str) -> None:
        self.errors[operation] += 1


def rate(name: str, limit: int, window_ms: int, tag: str = "k1") -> RateBucket:
    return RateBucket(f"t:{{{tag}}}:r:{name}", limit, window_ms)


def counter(name: str, limit: int, window_ms: int, tag: str = "k1") -> RateBucket:
    """An `exact: false` rate bucket (":a:" like the gateway's names, never a log's key)."""
    return RateBucket(f"t:{{{tag}}}:a:{name}", limit, window_ms, exact=False)


def slot(name: str, limit: int, tag: str = "k1") -> SlotBucket:
    return SlotBucket(f"t:{{{tag}}}:s:{name}", limit)


@dataclass
class Backend:
    name: str
    make_client: Callable[[], aredis.Redis] | None  # None: the memory store
    url: str | None = None  # set: stores are built from the URL (the pipelined connection)
    stores: list[Any] = field(default_factory=list)

    @property
    def is_redis(self) -> bool:
        return self.make_client is not None

    def new(
        self,
        *,
        lease: float = 10.0,
        clock: Callable[[], float] | None = None,
        observer: RecordingObserver | None = None,
        timeout: float = 1.0,
        max_connections: int = 64,
    ) -> Any:
        """A fresh store on this backend (not started). Redis stores share one server, like
        replicas; with clock=None they read Redis TIME."""
        store: Any
        if self.make_client is None:
            store = MemoryStore(lease, clock=clock or DrivenClock(), observer=observer)
        elif self.url is not None:
            store = RedisStore(self.url, prefix="t", timeout=timeout, lease=lease, clock=clock, observer=observer,
                               max_connections=max_connections)
        else:
            store = RedisStore.from_client(
                self.make_client(),
                prefix="t",
                timeout=timeout,
                lease=lease,
                clock=clock,
                observer=observer,
                max_connections=max_connections,
            )
        self.stores.append(store)
        return store

    async def started(self, **kwargs: Any) -> Any:
        store = self.new(**kwargs)
        await store.start()
        return store


def fake_client_factory() -> Callable[[], aredis.Redis]:
    server = fakeredis.FakeServer()
    return lambda: fakeredis.FakeAsyncRedis(server=server)


async def assert_no_leaks(client: aredis.Redis) -> None:
    """Every key carries a TTL; every slot set (":s:" in its name) is empty."""
    problems = []
    async for key in client.scan_iter(count=500):
        ttl = await client.pttl(key)
        if ttl == -2:
            continue  # expired between SCAN and PTTL
        if ttl <= 0:
            problems.append(f"{key!r} has no TTL ({ttl})")
        if b":s:" in key and await client.zcard(key):
            members = await client.zrange(key, 0, -1)
            problems.append(f"slot set {key!r} still holds {members!r}")
    if problems:
        pytest.fail("store left state behind: " + "; ".join(problems))


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        made = Backend("memory", None)
    elif request.param == "fakeredis":
        made = Backend("fakeredis", fake_client_factory())
    else:
        url = request.getfixturevalue("redis_url")
        made = Backend(request.param, lambda: aredis.Redis.from_url(url),
                       url=url if request.param == "redis" else None)
    yield made
    for store in made.stores:
        await store.aclose()
    if made.make_client is not None:
        client = made.make_client()
        try:
            await assert_no_leaks(client)
        finally:
            await client.aclose()


@pytest.fixture
def clock() -> DrivenClock:
    return DrivenClock()


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()
