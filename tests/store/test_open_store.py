"""`open_store` picks the store by URL scheme; Redis clients get every timeout from
`store.timeout` (never redis-py's 5 s defaults and 10 retries). No I/O here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from gateway.config.model import Store
from gateway.store import MemoryStore, RedisStore, open_store
from gateway.store.bans import MemoryBanStore
from gateway.store.pipelined import PipelinedRedis
from gateway.store.redis_bans import RedisBanStore
from gateway.store.redis_client import RedisPyTransport, connect, parse_multi_host
from gateway.store.redis_jobs import RedisJobStore
from gateway.store.transport import Transport

pytestmark = pytest.mark.anyio


async def test_memory_url_gives_the_memory_stores() -> None:
    stores = open_store(Store(url="memory://", lease=5.0, on_error="local"))
    assert isinstance(stores.admission, MemoryStore)
    assert isinstance(stores.bans, MemoryBanStore)
    assert stores.jobs is stores.admission  # the memory store holds its own jobs
    assert stores.local is None and stores.local_jobs is None  # local already: no fallback
    assert stores.job_stores() == ((stores.admission, stores.admission),)


async def test_redis_url_gives_the_redis_stores_and_the_local_fallback() -> None:
    stores = open_store(Store(url="redis://127.0.0.1:6399/2", timeout=0.1, on_error="local"))
    assert isinstance(stores.admission, RedisStore)
    assert isinstance(stores.bans, RedisBanStore)
    assert isinstance(stores.jobs, RedisJobStore)
    assert isinstance(stores.local, MemoryStore)
    assert stores.local_jobs is stores.local  # jobs admitted while Redis is away are held locally
    assert stores.job_stores() == ((stores.admission, stores.jobs), (stores.local, stores.local))
    await stores.admission.aclose()
    denying = open_store(Store(url="redis://127.0.0.1:6399/2", timeout=0.1, on_error="deny"))
    assert denying.local is None and denying.job_stores() == ((denying.admission, denying.jobs),)


def test_nothing_outside_the_store_package_names_a_concrete_store() -> None:
    """One door into gateway/store/: backends are chosen there (no concrete class, no dispatch
    function is named outside it), and the store package does not depend on the admission logic
    built on it."""
    root = Path(__file__).resolve().parents[2] / "gateway"
    concrete = re.compile(
        r"\b(MemoryStore|RedisStore|MemoryBanStore|RedisBanStore|RedisJobStore"
        r"|ban_store_for|job_store_for|PipelinedRedis|RedisPyTransport)\b"
    )
    outside = [str(path.relative_to(root)) for path in root.rglob("*.py")
               if "store" not in path.relative_to(root).parts[:1] and concrete.search(path.read_text())]
    assert outside == []
    inside = [str(path.relative_to(root)) for path in (root / "store").rglob("*.py")
              if "gateway.admission" in path.read_text()]
    assert inside == []


def test_the_redis_store_has_no_transport_branch() -> None:
    """RedisStore keeps admission semantics only: it names no concrete transport, no
    transport-specific error or attribute (`_fast`, `_pool`, hiredis' ReplyError); the one
    place that picks a transport is `open_transport`."""
    source = (Path(__file__).resolve().parents[2] / "gateway" / "store" / "redis.py").read_text()
    tree = ast.parse(source)
    (store,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RedisStore"]
    names = {node.id for node in ast.walk(store) if isinstance(node, ast.Name)}
    attributes = {node.attr for node in ast.walk(store) if isinstance(node, ast.Attribute)}
    assert not names & {"PipelinedRedis", "RedisPyTransport", "Endpoint", "ReplyError", "pack_command"}
    assert not attributes & {"_fast", "_pool", "send", "call", "release_pipeline"}
    isinstance_on_transport = [
        node for node in ast.walk(store)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
        and "_transport" in ast.unparse(node.args[0])
    ]
    assert isinstance_on_transport == []


@pytest.mark.parametrize("transport", [PipelinedRedis, RedisPyTransport])
def test_both_transports_implement_the_whole_interface(transport: type[Transport]) -> None:
    # (send_packed: called only with what eval_format gave, and redis-py gives None.)
    missing = [name for name, member in vars(Transport).items()
               if callable(member) and not name.startswith("__")
               and name not in ("eval", "needs_reload", "send_packed")
               and getattr(transport, name) is member]
    assert missing == []


async def test_the_url_picks_the_transport() -> None:
    pipelined = RedisStore("redis://127.0.0.1:6399/2", prefix="t", timeout=0.1, lease=5.0)
    tls = RedisStore("rediss://127.0.0.1:6399/2", prefix="t", timeout=0.1, lease=5.0)
    try:
        assert isinstance(pipelined._transport, PipelinedRedis)  # plain redis://: the fast path
        assert isinstance(tls._transport, RedisPyTransport)
    finally:
        await pipelined.aclose()
        await tls.aclose()


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="scheme"):
        open_store(Store(url="memcached://127.0.0.1"))


async def test_standalone_client_timeouts_come_from_the_store_timeout() -> None:
    connection = connect("redis://127.0.0.1:6399/2", timeout=0.1, max_connections=8)
    try:
        client = connection.client
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == 8
        assert pool.timeout is not None and pool.timeout < 0.1
        kwargs = pool.connection_kwargs
        assert kwargs["socket_timeout"] == 0.1
        assert kwargs["socket_connect_timeout"] == 0.1
        assert kwargs["db"] == 2
        # redis-py never re-sends by itself (a broken connection may have run the command):
        # the store re-sends only what is replay-safe (tests/faults/test_replays.py).
        assert kwargs["retry"].get_retries() == 0
    finally:
        await connection.aclose()


async def test_cluster_client_timeouts_come_from_the_store_timeout() -> None:
    connection = connect("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", timeout=0.1, max_connections=8)
    try:
        assert connection.is_cluster
        client = connection.client
        assert isinstance(client, RedisCluster)
        startup = client.nodes_manager.startup_nodes.values()
        assert [(node.host, node.port) for node in startup] == [
            ("127.0.0.1", 7000),
            ("127.0.0.1", 7001),
        ]
        assert client.connection_kwargs["socket_timeout"] == 0.1
    finally:
        await connection.aclose()


def test_multi_host_urls_parse() -> None:
    parsed = parse_multi_host("redis+sentinel://user:p%40ss@h1:26380,[::1]:26381,h3/mymaster/4?x=1", 26379)
    assert parsed.nodes == [("h1", 26380), ("::1", 26381), ("h3", 26379)]
    assert (parsed.username, parsed.password) == ("user", "p@ss")
    assert parsed.path == ["mymaster", "4"]
    assert parsed.query == {"x": "1"}


def test_sentinel_url_needs_a_service_name() -> None:
    with pytest.raises(ValueError, match="service name"):
        connect("redis+sentinel://127.0.0.1:26379", timeout=0.1, max_connections=4)


async def test_sentinel_service_name_may_come_from_the_query() -> None:
    connection = connect(
        "redis+sentinel://127.0.0.1:26379?service_name=gw&db=5", timeout=0.1, max_connections=4
    )
    try:
        client = connection.client
        assert isinstance(client, Redis)
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "gw"
        assert pool.connection_kwargs["db"] == 5
        assert pool.connection_kwargs["socket_timeout"] == 0.1
    finally:
        await connection.aclose()
