"""Build a redis-py asyncio client from a store URL, with every timeout explicit.

redis-py's defaults (5 s socket timeouts, 10 retries with backoff, a pool that raises past
its size) would let one store call hang for tens of seconds; here every wait derives from
`store.timeout`, and redis-py never re-sends a command itself: its retry re-sends a whole
pipeline after a connection error even when Redis already ran it, which would run a
state-changing script twice. The store re-sends only what is safe to run twice
(gateway/store/redis.py); the Sentinels, asked only where the master is, keep one retry.
On Cluster, redis-py follows MOVED, but a slot in migration (TRYAGAIN, ASK) is handled here:
the call is sent again after short pauses within its budget, then answered `SlotMigrating`.

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
The URL is taken apart by gateway/config/settings.py::parse_redis_url, the config loader's own
check, and the client is built from that (not from redis-py's `from_url`, which would pass any
query option on to the connection class and fail only when the worker opens the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config.store_url import (
    CLUSTER_SCHEMES,
    REDIS_SCHEMES,
    SENTINEL_SCHEMES,
    RedisTarget,
    parse_redis_url,
)
from gateway.config.store_url import ParsedMultiHost as ParsedMultiHost  # (re-exported: tests)
from gateway.config.store_url import StoreUrlError as StoreUrlError  # what connect() raises
from gateway.config.store_url import parse_multi_host as parse_multi_host
from gateway.store.base import SlotMigrating, StoreError
from gateway.store.scripts import Script
from gateway.store.transport import (
    RELEASE_RETRY_PAUSE,
    RELEASE_RETRY_PAUSE_MAX,
    Call,
    ConnectionLost,
    OnReply,
    ScriptSet,
    Transport,
    ignore,
    release_can_land,
    shared,
)

AnyRedis = Redis | RedisCluster
log = logging.getLogger(__name__)

SCHEMES = REDIS_SCHEMES


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

    async def check_master(self) -> None:
        """Sentinel: ask now where the master is (a command met READONLY); else nothing."""
        if self.follow_master is not None:
            await self.follow_master()

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


# Error replies that say the command did not run: safe to send again once the cause is fixed.
NOT_RUN: tuple[type[BaseException], ...] = (NoScriptError, ReadOnlyError)

# What a redis-py call can fail with, short of a bug.
FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
    StoreError,
    # uvloop raises RuntimeError("unable to perform operation on <TCPTransport closed=True>")
    # when redis-py writes to a connection Redis has just reset (restart, RST); redis-py drops
    # that connection, and for the caller it is one more failed call (tests/faults).
    RuntimeError,
)

# Cluster: how many times redis-py sends one command that met a redirect or TRYAGAIN before it
# gives up ("TTL exhausted"). Its default, 16, ends in eight 50 ms pauses on TRYAGAIN, far past
# any store budget. Two follow one MOVED or ASK (a pipeline's first pass is not counted).
CLUSTER_REDIRECTS = 2
# Scripts on a migrating slot are sent again after these pauses (doubling), while the budget
# leaves a round trip's margin after the pause.
SLOT_PAUSE = 0.005
SLOT_PAUSE_MAX = 0.1
SLOT_ROUND = 0.01


def slot_migrating(reply: object) -> bool:
    """Cluster: the reply says the call did not run because its slot is moving between primaries
    (TRYAGAIN; a MOVED or ASK left over; redis-py's redirect budget spent on those)."""
    return isinstance(reply, (TryAgainError, AskError)) or (
        isinstance(reply, ClusterError) and "TTL exhausted" in str(reply))


@functools.lru_cache(maxsize=65536)
def _slot_of(tag: str) -> int:
    """The hash slot of a key tag (a config's tags: one per key or workspace)."""
    return key_slot(tag.encode())


# Told the replies of a pipeline's ZREMs (each key's, in order; or the pipeline's failure in each place).
ZremReplies = Callable[[dict[str, list[str]], Sequence[object]], None]

# Hot-path batches are capped so a burst becomes several pipelines in parallel, not one huge one.
BATCH = 256


class RedisPyTransport(Transport):
    """The Transport over redis-py (TLS, Sentinel, Cluster; tests: fakeredis): each batch is
    one pipeline on a pooled connection, at most `max_connections` at a time, so the pool never
    has to refuse one.

    The hot path, done by hand since a pool has no order: `send_eval` calls queued in one loop
    iteration go out as one pipeline (one task per batch, not per call), after the releases
    still waiting to be sent (in the same pipeline: a slot freed before the call was issued is
    free when Redis decides it, and it saves that round trip). `release` queues ZREMs for one
    flusher task that sends everything pending as one pipeline per tick, wake-up PUBLISHes after
    them; calls issued while a release pipeline is on its way wait for it to land."""

    def __init__(self, connection: RedisConnection, *, timeout: float, max_connections: int) -> None:
        self.connection = connection
        self.client = connection.client
        self.is_cluster = connection.is_cluster
        self.failure_domain = self._primary_of if self.is_cluster else None
        # redis-py's cluster pipeline writes from tasks of its own (one per node): a turn later.
        self.release_turns = 2 if self.is_cluster else 1
        self.scripts = ScriptSet(self._load_all)
        self.on_release_error = ignore
        self._timeout = timeout
        self._in_flight = asyncio.Semaphore(max_connections)
        self._master_check: asyncio.Future[None] | None = None  # Sentinel: one at a time
        self._queued: dict[str, tuple[Script, list[tuple[Call, OnReply]]]] = {}  # by script sha
        self._batches: set[asyncio.Task[None]] = set()
        self._releases: dict[tuple[str, str], None] = {}
        self._channels: set[str] = set()  # wake-ups the next release flush publishes
        # Release pipelines on their way to Redis, by primary (Cluster; else all under None):
        # calls issued meanwhile to that primary wait for them.
        self._releases_landing: dict[object, set[asyncio.Future[None]]] = {}
        # Release flushes in flight: one starts in every loop iteration that queued a release
        # (not after the last one's reply), so that it is written in the iteration after its
        # release (the caller lets the loop turn for it: gateway/proxy/forwarder.py).
        self._release_tasks: set[asyncio.Task[None]] = set()
        self._flush_due = False  # a flush task is created and has not taken the pending releases yet
        self._release_shas: set[str] = set()  # scripts sent by send_release_eval
        # Releases that did not land, since when (sent again: _retry_failed); the pause before the next try.
        self._refused_since: dict[tuple[str, str], float] = {}
        self._retry_pause = RELEASE_RETRY_PAUSE
        self._releases_failing = False  # (logged once per streak)
        self._closed = False

    def _primary_of(self, key: str) -> object:
        """Cluster: the primary that owns `key`'s slot (its hash tag's) in the client's map
        (None: no map yet)."""
        try:
            return self.client.nodes_manager.get_node_from_slot(_slot_of(key)).name
        except (SlotNotCoveredError, AttributeError):
            return None

    def _zrems_by_primary(self, zrems: dict[str, list[str]]) -> dict[object, dict[str, list[str]]]:
        groups: dict[object, dict[str, list[str]]] = {}
        for key, members in zrems.items():
            groups.setdefault(self._primary_of(key), {})[key] = members
        return groups

    # -- the hot path ------------------------------------------------------------------

    def eval_format(self, script: Script, keys: list[str], args: list[str | int], holes: Sequence[str]) -> None:
        return None  # redis-py packs each pipeline itself: calls come as lists (send_eval)

    def send_eval(self, script: Script, keys: list[str], args: list[str | int], on_reply: OnReply) -> None:
        if self._closed:
            on_reply(StoreError("store is closed"))
            return
        queued = self._queued.get(script.sha)
        if queued is None:
            # The batch task first runs on the next loop iteration: every call queued during
            # this one has joined the batch by then.
            queued = self._queued[script.sha] = (script, [])
            self._spawn(self._send_queued(script))
        queued[1].append(((keys, args), on_reply))

    async def _send_queued(self, script: Script) -> None:
        _, queued = self._queued.pop(script.sha)
        batch = queued[:BATCH]
        if len(queued) > BATCH:  # the rest goes out in parallel
            self._queued[script.sha] = (script, queued[BATCH:])
            self._spawn(self._send_queued(script))
        if self.is_cluster:
            # A batch per primary, each answered as soon as its primary has: one primary down
            # or stalled must not hold the others' replies, or wait for their releases.
            groups: dict[object, list[tuple[Call, OnReply]]] = {}
            for item in batch:
                keys = item[0][0]
                groups.setdefault(self._primary_of(keys[0]) if keys else None, []).append(item)
            if len(groups) > 1:
                await asyncio.gather(*(self._send_batch(script, group, primary) for primary, group in groups.items()))
                return
            (primary,) = groups
        else:
            primary = None
        await self._send_batch(script, batch, primary)

    async def _send_batch(self, script: Script, batch: list[tuple[Call, OnReply]], primary: object) -> None:
        # A release script's batch (settle.lua) is a release: later calls wait for it to land.
        early = self._landing(primary) if script.sha in self._release_shas else None
        before = [landing for landing in self._releases_landing.get(primary, ()) if landing is not early]
        if before:
            # Release pipelines are on their way on other connections: let them land first.
            try:
                await asyncio.wait(before, timeout=self._timeout)
            except BaseException:
                if early is not None:
                    self._landed(primary, early)
                raise
        releases = self._take_releases_for_piggyback(primary)
        landed = early
        if landed is None and releases:
            landed = self._landing(primary)  # later calls wait for these ZREMs too
        replies: list[object]
        try:
            # One primary's batch (see _send_queued): its one pipeline, not grouped again.
            replies = await self._one_pipeline(script, [call for call, _ in batch], self._timeout,
                                               releases or None, self._release_replies)
        except ConnectionLost as exc:
            # The pipeline may have run, in part or whole. Its ZREMs are idempotent: back to the
            # front of the queue, so that the callers' resends (only they know whether their call
            # may go again) carry them first in their pipeline, as before the loss.
            if releases:
                self._requeue(releases)
            replies = [exc] * len(batch)
        except FAILURES as exc:
            if releases:
                self._release_replies(releases, [exc] * len(releases))
            replies = [exc] * len(batch)
        except BaseException as exc:
            for _, on_reply in batch:
                on_reply(exc)
            raise
        finally:
            if landed is not None:
                self._landed(primary, landed)
        for (_, on_reply), reply in zip(batch, replies, strict=True):
            on_reply(reply)

    def send_release_eval(self, script: Script, keys: list[str], args: list[str | int], on_reply: OnReply) -> None:
        self._release_shas.add(script.sha)
        self.send_eval(script, keys, args, on_reply)

    def _requeue(self, releases: dict[str, list[str]]) -> None:
        pending = {(key, member): None for key, members in releases.items() for member in members}
        pending.update(self._releases)
        self._releases = pending
        # Whatever no resend takes along goes with the flusher (it runs after the resends
        # queued by the callbacks this batch is about to call).
        asyncio.get_running_loop().call_soon(self._start_flusher)

    def _start_flusher(self) -> None:
        if self._releases and not self._closed and not self._flush_due:
            self._flush_due = True
            task = asyncio.get_running_loop().create_task(self._flush_releases(), name="redis-store-release")
            self._release_tasks.add(task)
            task.add_done_callback(self._release_tasks.discard)

    def release(self, keys: Sequence[str], members: Sequence[str], channels: Sequence[str]) -> None:
        if self._closed:
            return
        for key in keys:
            for member in members:
                self._releases[(key, member)] = None
        self._channels.update(channels)
        if not self._flush_due:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop any more: the leases expire on their own
            self._start_flusher()

    async def flush(self) -> None:
        while True:  # hot-path batches and release pipelines in flight end within their budget
            if self._batches:
                await asyncio.wait(list(self._batches))
            elif self._release_tasks:
                await asyncio.wait(list(self._release_tasks))
            else:
                return

    async def _flush_releases(self) -> None:
        self._flush_due = False  # releases queued from now on start the next flush
        if not self._releases:
            return
        batch, self._releases = self._releases, {}
        channels, self._channels = list(self._channels), set()
        members: dict[str, list[str]] = {}
        for key, member in batch:
            members.setdefault(key, []).append(member)
        if not self.is_cluster:
            # Calls issued from now on wait for this batch to land (see _send_queued),
            # including while it waits for a free connection.
            landed = self._landing(None)
            try:
                await self._release_group(members, channels)
            finally:
                self._landed(None, landed)
            return
        # Cluster: a pipeline per primary, each within its own budget, landing for that
        # primary's calls alone: a primary down or stalled fails and delays its own releases
        # only, not the others' (whose slots would look held meanwhile, or until their leases
        # expire). The first in this task (written in this iteration), the others in their own.
        # Wake-ups once every ZREM has landed.
        (primary, group), *others = self._zrems_by_primary(members).items()
        sent = [self._spawn_release(other, other_group) for other, other_group in others]
        landed = self._landing(primary)
        try:
            await self._release_group(group, ())
        finally:
            self._landed(primary, landed)
        if sent:
            await asyncio.wait(sent)
        if channels:
            await self._release_group({}, channels)

    def _spawn_release(self, primary: object, members: dict[str, list[str]]) -> asyncio.Task[None]:
        landed = self._landing(primary)  # at once: calls issued from now on wait for it

        async def release() -> None:
            try:
                await self._release_group(members, ())
            finally:
                self._landed(primary, landed)

        return self._spawn(release())

    async def _release_group(self, members: dict[str, list[str]], channels: Sequence[str]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    replies = await self._release_pipeline(members, channels)
                except ConnectionLost:  # ZREM and PUBLISH are safe to send again, once
                    replies = await self._release_pipeline(members, channels)
        except FAILURES as exc:
            self._release_replies(members, [exc] * len(members))
            return
        self._release_replies(members, replies)

    def _release_replies(self, zrems: dict[str, list[str]], replies: Sequence[object]) -> None:
        """The replies to `zrems`' ZREMs (then any PUBLISH): what failed is counted, logged once
        per failing streak, and sent again (_retry_failed)."""
        failed = self._retry_failed(zrems, replies)
        if failed:
            self.on_release_error()
            if not self._releases_failing:
                self._releases_failing = True
                log.warning("store releases are failing (each is sent again until it lands or a lease "
                            "has passed): %r", failed[0])
        elif self._releases_failing and zrems:
            self._releases_failing = False
            log.info("store releases land again")

    def _retry_failed(self, zrems: dict[str, list[str]], replies: Sequence[object]) -> list[object]:
        """ZREMs that did not land (an error reply, or their pipeline failed: Redis down or
        stalled, a failover, a slot in migration) go again after a pause, each until it lands or
        `release_retry_for` has passed (the lease: by then its slot, never renewed, has expired).
        Otherwise the slot would look held until then, and clients within their limit get 429s.
        ZREM is idempotent and a lease id is never reused: sending one twice frees nothing else.
        Not sent again: a key holding another type (WRONGTYPE: it would fail the same way).
        Returns the failures (a slot in migration only once given up: it is expected to end)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        retry: dict[str, list[str]] = {}
        failed: list[object] = []
        for (key, members), reply in zip(zrems.items(), replies, strict=False):
            landed = not isinstance(reply, BaseException)
            if not landed and not slot_migrating(reply):
                failed.append(reply)
            for member in members:
                if landed or not release_can_land(reply):
                    self._refused_since.pop((key, member), None)
                elif now - self._refused_since.setdefault((key, member), now) <= self.release_retry_for:
                    retry.setdefault(key, []).append(member)
                else:  # given up: the lease has expired by now
                    del self._refused_since[(key, member)]
                    if slot_migrating(reply):  # a migration left half-done
                        failed.append(reply)
        failed += [reply for reply in replies[len(zrems):] if isinstance(reply, BaseException)]
        if retry:
            loop.call_later(self._retry_pause, self._requeue, retry)
            self._retry_pause = min(2 * self._retry_pause, RELEASE_RETRY_PAUSE_MAX)
        else:
            self._retry_pause = RELEASE_RETRY_PAUSE
        return failed

    def _take_releases_for_piggyback(self, primary: object) -> dict[str, list[str]]:
        """Pending releases, grouped by key, taken over by a hot-path pipeline to `primary`
        (Cluster: only its keys'; else all). Left to the flusher while wake-ups are pending:
        those must be published after their ZREMs."""
        if not self._releases or self._channels:
            return {}
        taken: Iterable[tuple[str, str]]
        if self.is_cluster:
            taken = [pair for pair in self._releases if self._primary_of(pair[0]) == primary]
            for pair in taken:
                del self._releases[pair]
        else:
            taken, self._releases = self._releases, {}
        members: dict[str, list[str]] = {}
        for key, member in taken:
            members.setdefault(key, []).append(member)
        return members

    def _landing(self, primary: object) -> asyncio.Future[None]:
        landed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releases_landing.setdefault(primary, set()).add(landed)
        return landed

    def _landed(self, primary: object, landed: asyncio.Future[None]) -> None:
        landing = self._releases_landing.get(primary)
        if landing is not None:
            landing.discard(landed)
            if not landing:
                del self._releases_landing[primary]
        if not landed.done():
            landed.set_result(None)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)
        return task

    # -- scripts and the rest ----------------------------------------------------------

    async def eval_batch(
        self,
        script: Script,
        calls: Sequence[Call],
        *,
        budget: float,
        zrems: dict[str, list[str]] | None = None,
        on_zrem_replies: ZremReplies | None = None,
    ) -> list[object]:
        """As Transport.eval_batch, after `zrems` (key -> members) in the same pipeline. Each
        round trip gets `budget`: a Redis that answered "not run" is alive, and the resend
        deserves its own. Cluster: a pipeline per primary (see _per_primary)."""
        if self.is_cluster:
            groups: dict[object, tuple[list[int], dict[str, list[str]]]] = {}
            for index, (keys, _) in enumerate(calls):
                groups.setdefault(self._primary_of(keys[0]) if keys else None, ([], {}))[0].append(index)
            for primary, group_zrems in self._zrems_by_primary(zrems or {}).items():
                groups.setdefault(primary, ([], {}))[1].update(group_zrems)
            if len(groups) > 1:
                return await self._per_primary(script, calls, list(groups.values()), budget, on_zrem_replies)
        return await self._one_pipeline(script, calls, budget, zrems, on_zrem_replies)

    async def _per_primary(self, script: Script, calls: Sequence[Call],
                           groups: list[tuple[list[int], dict[str, list[str]]]], budget: float,
                           on_zrem_replies: ZremReplies | None) -> list[object]:
        """Cluster: each primary's calls (and ZREMs) in a pipeline of their own, side by side,
        each within the budget. A primary down or stalled fails its own calls only, as replies:
        the others' calls are answered (and a caller keeps a breaker per primary,
        `failure_domain`), where one pipeline over all of them would fail or time out whole."""

        async def one(indexes: list[int], group_zrems: dict[str, list[str]]) -> list[object]:
            try:
                return await self._one_pipeline(script, [calls[index] for index in indexes], budget,
                                                group_zrems or None, on_zrem_replies)
            except ConnectionLost as exc:  # perhaps run: the callers decide; ZREMs go again
                if group_zrems:
                    self._requeue(group_zrems)
                return [exc] * len(indexes)
            except FAILURES as exc:
                if group_zrems and on_zrem_replies is not None:
                    on_zrem_replies(group_zrems, [exc] * len(group_zrems))
                return [exc] * len(indexes)

        results = await asyncio.gather(*(one(indexes, group_zrems) for indexes, group_zrems in groups))
        replies: list[object] = [None] * len(calls)
        for (indexes, _), group_replies in zip(groups, results, strict=True):
            for index, reply in zip(indexes, group_replies, strict=True):
                replies[index] = reply
        return replies

    async def _one_pipeline(self, script: Script, calls: Sequence[Call], budget: float,
                            zrems: dict[str, list[str]] | None,
                            on_zrem_replies: ZremReplies | None) -> list[object]:
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(budget):
            await self._in_flight.acquire()
        try:
            generation = self.scripts.generation
            async with asyncio.timeout(budget):
                replies = await self._pipeline(script.sha, calls, zrems, on_zrem_replies)
            # At most two rounds of "not run": a new master may lack the scripts as well.
            for _ in range(2):
                unrun = [index for index, reply in enumerate(replies) if isinstance(reply, NOT_RUN)]
                if not unrun:
                    break
                async with asyncio.timeout(budget):
                    if any(isinstance(replies[index], ReadOnlyError) for index in unrun):
                        await shared(self, "_master_check", self.connection.check_master)
                    if any(isinstance(replies[index], NoScriptError) for index in unrun):
                        await self.scripts.reload(generation)
                generation = self.scripts.generation
                async with asyncio.timeout(budget):
                    retried = await self._pipeline(script.sha, [calls[index] for index in unrun])
                for index, reply in zip(unrun, retried, strict=True):
                    replies[index] = reply
        finally:
            self._in_flight.release()
        if self.is_cluster:  # (its pauses hold no connection)
            await self._through_migrations(script.sha, calls, replies, started + budget)
        return replies

    async def _through_migrations(self, sha: str, calls: Sequence[Call], replies: list[object],
                                  deadline: float) -> None:
        """Cluster: calls that met a redirect or TRYAGAIN ran nothing. MOVED (the slot has moved:
        redis-py follows it and learns the new owner) goes again at once, and so, once the
        scripts are loaded again, does NOSCRIPT from that owner (a primary added since they were
        loaded); a slot still moving (ASK, TRYAGAIN) after a pause, while the budget allows;
        then `SlotMigrating` (the caller decides that request alone, with nothing to undo)."""
        loop = asyncio.get_running_loop()
        pause = SLOT_PAUSE
        reloads, generation = 0, self.scripts.generation
        while True:
            moving = [index for index, reply in enumerate(replies) if slot_migrating(reply)]
            unloaded = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if unloaded and reloads < 2:
                reloads += 1
                try:
                    async with asyncio.timeout(deadline - loop.time()):
                        await self.scripts.reload(generation)
                except FAILURES:
                    unloaded = []  # their replies stay NOSCRIPT: failed calls
                generation = self.scripts.generation
            else:
                unloaded = []
            if not moving and not unloaded:
                return
            moved = [index for index in moving if isinstance(replies[index], MovedError)] + unloaded
            group, wait = (moved, 0.0) if moved else (moving, pause)
            if deadline - loop.time() < wait + SLOT_ROUND:
                for index in moving:
                    replies[index] = SlotMigrating(f"its cluster slot is being migrated: {replies[index]!r}")
                return
            if wait:
                await asyncio.sleep(wait)
                pause = min(2 * pause, SLOT_PAUSE_MAX)
            try:
                async with asyncio.timeout(deadline - loop.time()), self._in_flight:
                    retried = await self._pipeline(sha, [calls[index] for index in group], follow=bool(moved))
            except FAILURES as exc:  # (a lost connection, a timeout: perhaps run now, the callers decide)
                retried = [exc] * len(group)
            for index, reply in zip(group, retried, strict=True):
                replies[index] = reply

    async def _pipeline(
        self,
        sha: str,
        calls: Sequence[Call],
        zrems: dict[str, list[str]] | None = None,
        on_zrem_replies: ZremReplies | None = None,
        *,
        follow: bool = False,
    ) -> list[object]:
        pipe = self.client.pipeline(transaction=False)
        for key, members in (zrems or {}).items():
            pipe.zrem(key, *members)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        try:
            if self.is_cluster:
                # Redirects come back as replies unless `follow` (see _through_migrations):
                # redis-py would resend each call on its own, one after another, and pause
                # 50 ms at every TRYAGAIN, which a migrating slot answers to every script.
                replies = await pipe.execute(raise_on_error=False, allow_redirections=follow)
            else:
                replies = await pipe.execute(raise_on_error=False)
        except RedisConnectionError as exc:
            raise ConnectionLost(f"Redis connection lost: {exc!r}") from exc
        released = len(zrems or ())
        if len(replies) != released + len(calls):
            raise StoreError(f"pipeline answered {len(replies)} replies to {released + len(calls)} commands")
        if released:
            if on_zrem_replies is not None:
                on_zrem_replies(zrems or {}, replies[:released])
        return list(replies[released:])

    async def _release_pipeline(self, zrems: dict[str, list[str]], channels: Sequence[str]) -> list[object]:
        """ZREM `zrems` (key -> members), then PUBLISH "1" on `channels` once they have landed
        (on Cluster, after the ZREM pipeline returned: they may be on other nodes)."""
        async with self._in_flight:
            pipe = self.client.pipeline(transaction=False)
            for key, members in zrems.items():
                pipe.zrem(key, *members)
            if not self.is_cluster:  # one connection: after the ZREMs
                for channel in channels:
                    pipe.publish(channel, "1")
            try:
                replies = list(await pipe.execute(raise_on_error=False))
                if channels and self.is_cluster:
                    pipe = self.client.pipeline(transaction=False)
                    for channel in channels:
                        pipe.publish(channel, "1")
                    replies += await pipe.execute(raise_on_error=False)
            except RedisConnectionError as exc:
                raise ConnectionLost(f"Redis connection lost: {exc!r}") from exc
            return replies

    async def zrem(self, key: str, member: str, *, budget: float) -> None:
        async with asyncio.timeout(budget), self._in_flight:
            await self.client.zrem(key, member)

    async def _load_all(self, scripts: Sequence[Script]) -> Sequence[object]:
        # Concurrently; on Cluster each SCRIPT LOAD goes to every primary.
        return await asyncio.gather(*(self.client.script_load(script.source) for script in scripts))

    async def ping(self) -> None:
        if self.is_cluster:
            await self.client.ping(target_nodes=RedisCluster.PRIMARIES)  # type: ignore[call-arg]
        else:
            await self.client.ping()

    async def aclose(self) -> None:
        # The connection is the store's (its wake-ups share it): it closes it.
        self._closed = True
        tasks = [*self._batches, *self._release_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, *FAILURES):
                await task
        self._releases.clear()


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def connect(url: str, *, timeout: float, max_connections: int) -> RedisConnection:
    """A client for `url`; no I/O happens until the first command. The URL is taken apart by
    `parse_redis_url`, the config loader's own check (StoreUrlError: it cannot be opened)."""
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_keepalive": True,
        # No retry: a command whose connection broke may have run (see the module docstring).
        # On Cluster this also stops the whole-pipeline retry; MOVED/ASK (not run) still follow.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.scheme in SENTINEL_SCHEMES:
        return _sentinel(target, common, max_connections)
    if target.scheme in CLUSTER_SCHEMES:
        return _cluster(target, common, max_connections)
    return _standalone(target, common, max_connections, timeout)


def _standalone(target: RedisTarget, common: dict[str, Any], max_connections: int, timeout: float) -> RedisConnection:
    where: dict[str, Any]
    if target.socket_path is not None:
        # A TCP option: UnixDomainSocketConnection refuses socket_keepalive.
        common = {key: value for key, value in common.items() if key != "socket_keepalive"}
        where = {"connection_class": UnixDomainSocketConnection, "path": target.socket_path}
    else:
        ((host, port),) = target.nodes
        where = {"host": host, "port": port}
        if target.tls:
            where["connection_class"] = SSLConnection
    pool = BlockingConnectionPool(
        max_connections=max_connections, timeout=timeout / 2, db=target.db, username=target.username,
        password=target.password, **where, **target.options, **common,
    )
    return RedisConnection(Redis.from_pool(pool))


def _sentinel(target: RedisTarget, common: dict[str, Any], max_connections: int) -> RedisConnection:
    service = target.service_name
    assert service is not None  # parse_redis_url refuses a Sentinel URL without one
    sentinel_kwargs = {key: common[key] for key in ("socket_timeout", "socket_connect_timeout", "socket_keepalive")}
    # Read-only questions (where is the master?): safe to ask again on a fresh connection.
    sentinel_kwargs["retry"] = Retry(NoBackoff(), 1, (RedisConnectionError,))
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
        sentinel_kwargs["username"] = target.sentinel_username
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **common)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        service,
        db=target.db,
        username=target.username,
        password=target.password,
        max_connections=max_connections,
        ssl=target.tls,
        connection_class=_MasterSSLConnection if target.tls else _MasterConnection,
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


def _cluster(target: RedisTarget, common: dict[str, Any], max_connections: int) -> RedisConnection:
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        max_connections=max_connections,
        ssl=target.tls,
        **common,
    )
    client.RedisClusterRequestTTL = CLUSTER_REDIRECTS
    return RedisConnection(client, is_cluster=True)
