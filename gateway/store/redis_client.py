"""Build a redis-py asyncio client from a store URL, with every timeout explicit.

redis-py's defaults (5 s socket timeouts, 10 retries with backoff, a pool that raises past
its size) would let one store call hang for tens of seconds; here every wait derives from
`store.timeout` and a dead pooled connection is retried once, on a fresh connection.

URL forms:
- `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS), `unix:///path.sock?db=N`
  (a Unix socket: no TCP keepalive, which redis-py's socket connection does not take)
- `redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]`
  The service name is the first path segment (or `?service_name=`); the db the second
  segment (or `?db=`). The credentials are the master's; `?sentinel_password=` (and
  `?sentinel_username=`) authenticate to the Sentinels themselves. `rediss+sentinel://`
  speaks TLS to the master (the config loader refuses it: untested).
- `redis+cluster://[user:password@]host:port[,host:port...]` (any reachable nodes; the rest
  of the topology is discovered). `rediss+cluster://` speaks TLS (refused by the config loader: untested).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

AnyRedis = Redis | RedisCluster
log = logging.getLogger(__name__)

STANDALONE_SCHEMES = frozenset({"redis", "rediss", "unix"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
SCHEMES = STANDALONE_SCHEMES | SENTINEL_SCHEMES | CLUSTER_SCHEMES


# How often a Sentinel-backed connection asks the Sentinels where the master is.
MASTER_CHECK_INTERVAL = 1.0


@dataclass
class RedisConnection:
    """The client the store talks through, and what else must be closed with it."""

    client: AnyRedis
    is_cluster: bool = False
    extra_closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    # Sentinel: one check of where the master is, reconnecting everything when it moved.
    follow_master: Callable[[], Awaitable[None]] | None = None
    _watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start background work (the Sentinel master watch); needs a running loop."""
        if self.follow_master is not None and self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_master(self.follow_master))

    @staticmethod
    async def _watch_master(follow_master: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(MASTER_CHECK_INTERVAL)
            try:
                await follow_master()
            except (RedisError, OSError, TimeoutError, RuntimeError) as exc:
                log.debug("Sentinel master check failed: %r", exc)

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        try:
            await self.client.aclose()
        finally:
            for close in self.extra_closers:
                await close()


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def connect(url: str, *, timeout: float, max_connections: int) -> RedisConnection:
    """A client for `url`; no I/O happens until the first command."""
    scheme = scheme_of(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        # One retry, on connection errors only: a pooled connection found dead after a
        # Redis restart is replaced at once. A timeout is not retried (the budget is spent).
        "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
        "health_check_interval": 0,
    }
    if scheme == "unix":
        del common["socket_keepalive"]  # a TCP option: UnixDomainSocketConnection refuses it
    if scheme in STANDALONE_SCHEMES:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout / 2, **common
        )
        return RedisConnection(Redis.from_pool(pool))
    if scheme in SENTINEL_SCHEMES:
        return _sentinel(url, scheme, common, max_connections)
    if scheme in CLUSTER_SCHEMES:
        return _cluster(url, scheme, common, max_connections)
    raise ValueError(f"unsupported store URL scheme {scheme!r}")


@dataclass(frozen=True)
class ParsedMultiHost:
    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None
    path: list[str]
    query: dict[str, str]


def parse_multi_host(url: str, default_port: int) -> ParsedMultiHost:
    """Split `scheme://[user:pass@]h1:p1,h2:p2/path?query` (urllib rejects the host list)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
    nodes: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [v6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"bad port in store URL node {item!r}") from None
        nodes.append((host, port))
    if not nodes:
        raise ValueError("store URL names no host")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    return ParsedMultiHost(nodes, username, password, path, query)


def _sentinel(url: str, scheme: str, common: dict[str, Any], max_connections: int) -> RedisConnection:
    parsed = parse_multi_host(url, default_port=26379)
    service = parsed.query.get("service_name") or (parsed.path[0] if parsed.path else "")
    if not service:
        raise ValueError("redis+sentinel:// URL needs a service name: .../service_name")
    db_text = parsed.query.get("db") or (parsed.path[1] if len(parsed.path) > 1 else "0")
    try:
        db = int(db_text)
    except ValueError:
        raise ValueError(f"bad db {db_text!r} in store URL") from None
    sentinel_kwargs = {
        key: common[key] for key in ("socket_timeout", "socket_connect_timeout", "socket_keepalive", "retry")
    }
    if parsed.query.get("sentinel_password"):
        sentinel_kwargs["password"] = parsed.query["sentinel_password"]
        sentinel_kwargs["username"] = parsed.query.get("sentinel_username")
    sentinel = Sentinel(parsed.nodes, sentinel_kwargs=sentinel_kwargs, **common)  # type: ignore[no-untyped-call]
    tls = scheme.startswith("rediss")
    client = sentinel.master_for(
        service,
        db=db,
        username=parsed.username,
        password=parsed.password,
        max_connections=max_connections,
        ssl=tls,
        connection_class=_MasterSSLConnection if tls else _MasterConnection,
    )
    closers: list[Callable[[], Awaitable[Any]]] = [node.aclose for node in sentinel.sentinels]
    pool = client.connection_pool

    async def follow_master() -> None:
        # redis-py asks the Sentinels only when it opens a connection, so after a failover that
        # left the old master alive (SENTINEL FAILOVER) pooled connections would keep writing
        # to it until Sentinel demotes it, ~10 s later: a split brain. Ask every second instead.
        known = pool.master_address
        async with asyncio.timeout(max(1.0, 3 * common["socket_timeout"])):
            address = await sentinel.discover_master(service)
        if known is not None and address != known:
            log.warning("the Redis master of %s moved to %s:%s; reconnecting", service, *address)
            pool.master_address = address
            await pool.disconnect(inuse_connections=True)

    return RedisConnection(client, extra_closers=closers, follow_master=follow_master)


class _MasterConnection(SentinelManagedConnection):
    """Reconnects to the current master, whichever way it reconnects.

    redis-py asks the Sentinels for the master in `connect()`, but a connection dropped in the
    middle of a command is reopened by `send_packed_command` through `connect_check_health`, to
    the host it had before: after a failover, the old master. Point it at the pool's master first.
    """

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        pool = self.connection_pool
        if not self.is_connected and pool.is_master and pool.master_address is not None:
            self.host, self.port = pool.master_address
        await super().connect_check_health(check_health, retry_socket_connect)


class _MasterSSLConnection(_MasterConnection, SentinelManagedSSLConnection):
    pass


def _cluster(url: str, scheme: str, common: dict[str, Any], max_connections: int) -> RedisConnection:
    parsed = parse_multi_host(url, default_port=6379)
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        max_connections=max_connections,
        ssl=scheme.startswith("rediss"),
        **common,
    )
    return RedisConnection(client, is_cluster=True)
