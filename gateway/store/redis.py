"""Redis admission store: any number of replicas share one exact view through Redis.

Critical path: exactly one round trip per admission. Every `admit` issued in one event-loop
tick joins a batch that goes out as one write of EVALSHA calls (admit.lua decides each request
atomically), and every caller gets its own answer or its own StoreError. Scripts are loaded
at `start()`; a NOSCRIPT in the replies (SCRIPT FLUSH, restart, failover) reloads them and
resends just those calls (see "Replays and undo" below).

This module keeps admission semantics only, with no branch on how Redis is reached: one
Transport (gateway/store/transport.py, chosen by `open_transport`) runs every script, queues
the hot path's admissions (`send_eval`, callback form, batched per loop iteration) and
releases (applied before any admission issued after them), pings and closes; NOSCRIPT and
READONLY are fixed once for everyone and nothing that may have run is re-sent. For a plain
`redis://` or `unix://` URL it is one pipelined connection (gateway/store/pipelined.py); for
TLS, Sentinel, Cluster, and clients built elsewhere (tests: fakeredis), redis-py pipelines on
a pool (gateway/store/redis_client.py), which batches and orders by hand.

Off the critical path:
- `release` only enqueues (on the transport). A ZREM that does not land is counted and sent
  again until it lands or a lease has passed (idempotent; lease ids are never reused): a slot
  looks held for an outage, not a lease after it. A
  release with a settlement is one settle.lua EVALSHA instead (frees the lease's members,
  re-prices, publishes the wake-up), queued like an admission (after the releases before it);
  idempotent by lease id, it is sent once more after a lost connection or a NOSCRIPT, and when
  given up its slots are released as above (the charge kept). A release that may free a
  slot someone waits for (`wake=True`), and a waiter leaving its queue, also PUBLISH on the
  bucket's hash-tag channel after the ZREM (gateway/store/wakeups.py).
- One heartbeat task renews every lease this process holds every lease/3 (renew.lua,
  batched per hash tag, pipelined); leases found gone are counted as lost.

Every call is bounded by `timeout` (socket, connect and pool waits come from it, and
asyncio.timeout backs it up); every redis/OS/timeout failure becomes StoreError and is
reported to the observer (per failed admission, per failed release flush, per failed
heartbeat round). Nothing needs a restart after Redis comes back: connections are
replaced as they fail and scripts reload on NOSCRIPT.

Replays and undo: what a client is told is what Redis holds, under any single fault.
- Nothing is re-sent by a retry layer unless it is safe to run twice: redis-py's own retry
  is off (gateway/store/redis_client.py) and the pipelined connection never re-sends.
- NOSCRIPT means "not run": the call waits for the one shared reload (single flight, all
  scripts at once) and goes again once.
- A connection lost after an admission was sent ("may have run"): the admission is sent once
  more. admit.lua is idempotent by lease id: a replay finds the lease's own entry (a log entry,
  a slot member, or for counters and quotas alone its trace) and answers "admitted" again,
  writing nothing (on redis-py the batch's callers each send theirs again:
  the next batch). ZREM is idempotent, so the transport sends releases again too (pipelined: once;
  redis-py: with the next pipeline, ahead of the resent admissions).
  Anything else (renew: the next heartbeat; job and ban scripts) is answered with the error.
- An admission whose caller is told "error" or gives up (timeout, lost reply twice,
  cancelled) is undone by its lease id: undo.lua removes its rate entries and slot members (and
  its counter and quota units) and puts the lease id in its hash tag's undone set, which admit.lua
  checks first, so the EVALSHA that lands after its undo (it sat unread in a stalled Redis)
  takes nothing. The undo goes off the caller's path, at once after a lost connection, else
  once Redis answers again (no undos fed to an outage), until it lands or a lease has passed
  (an unrenewed slot has expired by then); the undone record lives two leases.
tests/faults/test_replays.py shows each case on both transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from gateway.store import scripts
from gateway.store.base import (
    ONE,
    AdmitResult,
    Charge,
    NullObserver,
    QueueSpot,
    QuotaBucket,
    QuotaUsage,
    RateBucket,
    Settlement,
    SlotBucket,
    SlotMigrating,
    StoreError,
    StoreObserver,
    StoreRejected,
    bounded,
    check_charge,
    lease_members,
    rejected_for_its_keys,
)
from gateway.store.pipelined import Endpoint, PipelinedRedis, ReplyError
from gateway.store.redis_client import FAILURES as REDIS_PY_FAILURES
from gateway.store.redis_client import AnyRedis, RedisConnection, RedisPyTransport, connect
from gateway.store.transport import Call, ConnectionLost, Transport
from gateway.store.wakeups import RedisWakeups

log = logging.getLogger(__name__)

# Everything a store call can fail with, short of a bug (StoreError: a reply that makes
# no sense, such as one meant for another call).
FAILURES: tuple[type[BaseException], ...] = (
    *REDIS_PY_FAILURES,
    ReplyError,  # an error reply on the pipelined connection
)

# renew.lua calls are chunked so no single script keeps Redis busy for long.
RENEW_CHUNK = 256

__all__ = ["Call", "RedisStore"]  # Call: what run_script takes (bans, jobs)


_KEY = operator.attrgetter("key")  # (map: no Python frame per call)

# Admission shapes kept per store (RedisStore._shapes): one per plan's buckets in use.
MAX_SHAPES = 4096


class _PendingAdmit:
    """One admission in flight: what it sends (and sends again after a lost connection or a
    NOSCRIPT: the same bytes, so the same lease id), its caller's future, and `answer`, the
    transport's callback for its reply (a bound method: no partial per admission). Made by
    `_pending_admit`: a class with a Python __init__ costs a slow type call per admission."""

    __slots__ = ("store", "shape", "lease_id", "echo", "operation", "queue", "cost", "future", "sent", "resent",
                 "reloads", "generation", "undone")
    store: RedisStore
    shape: scripts.AdmitShape  # the buckets (also for undo.lua's call, built only if ever needed)
    lease_id: str
    echo: bytes | None  # the lease id as packed, what Redis echoes (else: decoded)
    operation: str
    queue: QueueSpot | None
    cost: int
    future: asyncio.Future[AdmitResult]
    sent: bytes | Call  # the EVALSHA packed (send_packed), or its KEYS and ARGV (send_eval)
    resent: bool  # sent again after its connection was lost
    reloads: int  # sent again after NOSCRIPT
    generation: int  # the script generation it was last sent with (set by every send)
    undone: bool

    def answer(self, reply: object) -> None:
        """Hand one admit.lua reply (or the error in its place) to the caller."""
        store = self.store
        if isinstance(reply, BaseException):
            store._admit_error(self, reply)
            return
        shape = self.shape
        try:
            result = (shape.layout if self.queue is None else shape.queued_layout).decode(
                reply, self.lease_id, shape.keys, self.echo)
        except StoreError as exc:
            store._fail(self, exc)
            return
        if store._undos:  # Redis answers again: what could not be undone before can be now
            store._flush_undos()
        if result.reclaimed:
            store._observer.slots_reclaimed(result.reclaimed)
        if self.future.done():
            # The caller gave up (cancelled): nobody will release what was taken.
            if result.admitted:
                store._undo(self)
            return
        self.future.set_result(result)


def _pending_admit(store: RedisStore, shape: scripts.AdmitShape, lease_id: str, operation: str,
                   queue: QueueSpot | None, cost: int) -> _PendingAdmit:
    pending = _PendingAdmit()
    pending.store = store
    pending.shape = shape
    pending.lease_id = lease_id
    pending.echo = None
    pending.operation = operation
    pending.queue = queue
    pending.cost = cost
    pending.future = asyncio.get_running_loop().create_future()
    pending.resent = False
    pending.reloads = 0
    pending.undone = False
    return pending  # (sent and generation: set by _start_admit)


def open_transport(url: str | None, connection: RedisConnection, *, timeout: float,
                   max_connections: int) -> Transport:
    """The pipelined connection for a plain `redis://` or `unix://` URL, else redis-py on
    `connection` (TLS, Sentinel, Cluster, and clients built elsewhere)."""
    endpoint = Endpoint.from_url(url) if url is not None else None
    if endpoint is not None:
        return PipelinedRedis(endpoint, timeout=timeout)
    return RedisPyTransport(connection, timeout=timeout, max_connections=max_connections)


class RedisStore:
    release_turns = 1  # a release is batched: written on the next loop iteration (or later: the transport's)
    # Every script, release and ping goes through one transport (gateway/store/transport.py);
    # the redis-py connection also carries the wake-up channel, whichever the transport is.
    _transport: Transport

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        timeout: float,
        lease: float,
        clock: Callable[[], float] | None = None,
        observer: StoreObserver | None = None,
        max_connections: int = 64,
    ) -> None:
        connection = connect(url, timeout=timeout, max_connections=max_connections + 2)
        self._setup(connection, url, prefix, timeout, lease, clock, observer, max_connections)

    @classmethod
    def from_client(
        cls,
        client: AnyRedis,
        *,
        prefix: str,
        timeout: float,
        lease: float,
        clock: Callable[[], float] | None = None,
        observer: StoreObserver | None = None,
        max_connections: int = 64,
        is_cluster: bool = False,
    ) -> RedisStore:
        """A store over a client built elsewhere (tests: fakeredis). The store closes it."""
        store = cls.__new__(cls)
        store._setup(
            RedisConnection(client, is_cluster=is_cluster),
            None,
            prefix,
            timeout,
            lease,
            clock,
            observer,
            max_connections,
        )
        return store

    def _setup(
        self,
        connection: RedisConnection,
        url: str | None,
        prefix: str,
        timeout: float,
        lease: float,
        clock: Callable[[], float] | None,
        observer: StoreObserver | None,
        max_connections: int,
    ) -> None:
        if timeout <= 0 or lease <= 0:
            raise ValueError("timeout and lease must be positive")
        self._connection = connection
        self._client = connection.client
        self._transport = open_transport(url, connection, timeout=timeout, max_connections=max_connections)
        self.failure_domain = self._transport.failure_domain  # Cluster: the primary of a tag
        self.release_turns = self._transport.release_turns
        self._prefix = prefix
        self.ready_tag = f"{prefix}:{{ready}}"  # the readiness probe's keys (check_ready)
        self._timeout = timeout
        self._lease = lease
        self._lease_ms = scripts.ms_arg(lease)
        self._clock = clock
        self._observer: StoreObserver = observer or NullObserver()
        self._admit_script = scripts.load("admit")
        self._renew_script = scripts.load("renew")
        self._undo_script = scripts.load("undo")
        self._settle_script = scripts.load("settle")
        self._quota_script = scripts.load("quota")
        # (quota.lua, an admin call, is loaded on first use by run_script.)
        for script in (self._admit_script, self._renew_script, self._undo_script, self._settle_script):
            self._transport.scripts.add(script)
        self._transport.on_release_error = functools.partial(self._observer.store_error, "release")
        self._transport.release_retry_for = lease
        # Undos not yet landed: lease id -> (undo.lua call, give up after), see _undo.
        self._undos: dict[str, tuple[Call, float]] = {}
        self._undo_task: asyncio.Task[None] | None = None
        # How long an undone lease id stays in its tag's undone set: an admission can land
        # late only while its connection's bytes wait unread in Redis (a stall); the undo is
        # itself retried for up to one lease, and whatever slot a later landing took would
        # expire within a lease, unrenewed. Two leases plus the retries cover both.
        self._undone_ttl_ms = scripts.ms_arg(2 * lease + 10 * timeout)
        self._held: dict[tuple[str, str], None] = {}
        # Admission shapes by the identity of their buckets (see _shape).
        self._shapes: dict[tuple[int, int, int], scripts.AdmitShape] = {}
        self._wakeups = RedisWakeups(self._client, f"{prefix}:wake:")
        self._heartbeat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._connection_closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the heartbeat, load the scripts and warm the pool. Raises StoreError
        within a bounded time when Redis is unreachable; the store stays usable and
        recovers by itself once Redis answers."""
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="redis-store-heartbeat")
            self._connection.start()  # Sentinel: follow the master (redis_client.py)
        try:
            async with asyncio.timeout(max(1.0, 5 * self._timeout)):
                await self._transport.scripts.load()
                await asyncio.gather(*(self._transport.ping() for _ in range(2)))  # two warm connections
        except FAILURES as exc:
            self._observer.store_error("ready")
            raise StoreError(f"store not ready at start: {exc!r}") from exc

    async def aclose(self) -> None:
        """Stop the heartbeat, flush pending releases, close connections. Leases still
        held are left to expire (a live request should have released them first)."""
        if self._closed:
            return
        self._closed = True
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        # Resends and undos in flight end within their budget (and may enqueue releases).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2 * self._timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        with contextlib.suppress(*FAILURES):
            async with asyncio.timeout(4 * self._timeout):
                await self.flush()  # admission batches and releases in flight
        await self._wakeups.aclose()
        self._held.clear()
        self._connection_closed = True
        with contextlib.suppress(*FAILURES):
            await self._transport.aclose()
        with contextlib.suppress(*FAILURES):
            await self._connection.aclose()

    # -- admission ---------------------------------------------------------------------

    async def admit(
        self,
        rates: Sequence[RateBucket],
        slots: Sequence[SlotBucket],
        lease_id: str,
        queue: QueueSpot | None = None,
        *,
        quotas: Sequence[QuotaBucket] = (),
        charge: Charge = ONE,
    ) -> AdmitResult:
        if charge is not ONE:
            check_charge(charge)
        if not rates and not slots and not quotas:
            return AdmitResult(True, None, 0, [], [], [])
        pending = self._start_admit(rates, slots, lease_id, "admit", queue, quotas, charge.cost)
        # (_await_admit inlined: one coroutine layer less per admission.)
        try:
            result = await pending.future
        except asyncio.CancelledError:
            # The caller will never see this admission (whether or not it ran, or will run):
            # take it back by its lease id now (undo.lua, which also stops a late landing).
            self._undo(pending)
            raise
        if result.admitted:
            # Renewed from now on: registered only once the caller has its answer (a lease
            # nobody knows about must not be renewed forever).
            refused = result.shadow_refused
            for key in pending.shape.slot_keys:
                if not refused or key not in refused:  # a shadow refusal holds nothing there
                    self._held[(key, lease_id)] = None
        return result

    async def check_ready(self) -> None:
        """Run admit.lua for real on a probe rate bucket and slot bucket under the prefix,
        then remove the probe lease (both keys carry a TTL whatever happens)."""
        tag = self.ready_tag
        # A 1 s window: a 1 ms one left a key whose PTTL could read 0 right after the probe.
        rate = RateBucket(f"{tag}:probe:r", 1 << 30, 1000)
        slot = SlotBucket(f"{tag}:probe:s", 1 << 30)
        lease_id = f"ready:{uuid.uuid4().hex}"
        await self._await_admit(self._start_admit((rate,), (slot,), lease_id, "ready", None, (), 1))
        try:
            await self._transport.zrem(slot.key, lease_id, budget=self._timeout)
        except FAILURES as exc:
            self._observer.store_error("ready")
            raise StoreError(f"readiness probe release failed: {exc!r}") from exc

    async def _await_admit(self, pending: _PendingAdmit) -> AdmitResult:
        """`pending`'s result (holding nothing: the caller releases what it took)."""
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._undo(pending)  # (as in admit)
            raise

    def _start_admit(
        self,
        rates: Sequence[RateBucket],
        slots: Sequence[SlotBucket],
        lease_id: str,
        operation: str,
        queue: QueueSpot | None,
        quotas: Sequence[QuotaBucket],
        cost: int,
    ) -> _PendingAdmit:
        """Send one admit.lua call; its reply reaches the returned admission's future."""
        if self._closed:
            raise StoreError("store is closed")
        shape = self._shapes.get((id(rates), id(slots), id(quotas)))
        if shape is None:
            shape = self._shape(rates, slots, quotas)
        pending = _pending_admit(self, shape, lease_id, operation, queue, cost)
        # The shape's packed call with this admission's lease id (and "now" and cost) filled in
        # (pipelined.fill, inlined): byte for byte what admit_call would pack.
        if cost == 1 and shape.common_command is not None and queue is None:
            lease = pending.echo = lease_id.encode()
            pending.sent = shape.common_command % (len(lease), lease)
        elif shape.command is not None and queue is None:
            lease = pending.echo = lease_id.encode()
            now = self._now().encode()
            units = b"%d" % cost
            pending.sent = shape.command % (len(lease), lease, len(now), now, len(units), units)
        else:
            pending.sent = shape.admit_call(lease_id, self._lease_ms, self._now(), queue, cost)
            self._send_admit(pending)
            return pending
        # (_send_admit of a packed call, inlined: nothing has been undone yet.)
        pending.generation = self._transport.scripts.generation
        self._transport.send_packed(pending.sent, pending.answer)
        return pending

    def _shape(
        self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], quotas: Sequence[QuotaBucket]
    ) -> scripts.AdmitShape:
        """The admission shape of these buckets (built on a plan's first admission, then kept)."""
        shape = scripts.AdmitShape(rates, slots, quotas)
        with contextlib.suppress(ValueError):  # a key holding a hole's marker: sent as lists
            shape.command = self._transport.eval_format(
                self._admit_script, *shape.holed_call(self._lease_ms), scripts.ADMIT_HOLES)
            if self._clock is None:  # "now" is always "" (Redis TIME): the common cost 1 needs one hole
                shape.common_command = self._transport.eval_format(
                    self._admit_script, *shape.holed_call(self._lease_ms, "", 1), scripts.ADMIT_HOLES[:1])
        if type(rates) is tuple and type(slots) is tuple and type(quotas) is tuple:
            # Kept by identity (a plan's buckets are immutable tuples, rebuilt on a config
            # reload): the entry holds them, so no other object can take their ids meanwhile.
            if len(self._shapes) >= MAX_SHAPES:
                del self._shapes[next(iter(self._shapes))]  # the oldest (FIFO)
            self._shapes[(id(rates), id(slots), id(quotas))] = shape
        return shape

    def _send_admit(self, pending: _PendingAdmit) -> None:
        if pending.undone:
            return  # given up (cancelled): undo.lua is on its way, a late admission would take nothing
        pending.generation = self._transport.scripts.generation
        sent = pending.sent
        if isinstance(sent, bytes):
            self._transport.send_packed(sent, pending.answer)
        else:
            keys, args = sent
            self._transport.send_eval(self._admit_script, keys, args, pending.answer)

    def _admit_error(self, pending: _PendingAdmit, reply: BaseException) -> None:
        """An error in place of `pending`'s reply: send again if that is safe, else fail it."""
        if pending.reloads < 2 and self._transport.needs_reload(reply):
            # (Twice at most: the scripts may be flushed again meanwhile.)
            pending.reloads += 1
            # Not run: safe to send again once the scripts are back (one reload for everyone).
            self._spawn(self._reload_and_resend(pending))
            return
        if isinstance(reply, ConnectionLost) and not pending.resent:
            # Perhaps run, reply lost: admit.lua answers a replayed lease id with its first
            # decision, so one resend on the next connection is safe.
            pending.resent = True
            self._send_admit(pending)
            return
        self._fail(pending, reply)

    async def _reload_and_resend(self, pending: _PendingAdmit) -> None:
        """Redis lost the scripts (SCRIPT FLUSH, restart, failover): wait for the one shared
        reload, send again once."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._transport.scripts.reload(pending.generation)
        except FAILURES as exc:
            self._fail(pending, exc)
            return
        if pending.future.done():
            self._fail(pending, StoreError("admission abandoned while reloading scripts"))
            return
        self._send_admit(pending)

    def _fail(self, pending: _PendingAdmit, exc: BaseException) -> None:
        # The script may have run (reply lost, timeout after sending), or may still run (its
        # bytes wait in a stalled Redis): the caller is told "error", so take it all back.
        # Unless every send is known not to have run (one send, refused for its migrating slot).
        if not (isinstance(exc, SlotMigrating) and not pending.resent):
            self._undo(pending, now=isinstance(exc, ConnectionLost))
        if pending.future.done():
            return
        self._observer.store_error(pending.operation)
        # One exception instance per caller: several tasks must not share a traceback.
        kind: type[StoreError] = StoreError
        if isinstance(exc, StoreRejected):
            kind = type(exc)
        elif rejected_for_its_keys(exc):
            kind = StoreRejected
        error = kind(str(exc) if isinstance(exc, StoreError) else f"{pending.operation} failed: {exc!r}")
        error.__cause__ = exc
        pending.future.set_exception(error)

    # -- undo ----------------------------------------------------------------------------

    def _undo(self, pending: _PendingAdmit, *, now: bool = True) -> None:
        """Take back `pending`'s admission by its lease id (undo.lua), once per admission, off
        the caller's path. Sent at once when Redis is likely answering (a lost connection, a
        caller gone); after a timeout, only once Redis has answered something again (the next
        successful admission, or the heartbeat's PING), so an outage is not fed undos that
        cannot land. Kept until it lands or one lease has passed: by then the slot, never
        renewed, has expired anyway."""
        if pending.undone or self._connection_closed:
            return
        pending.undone = True
        shape = pending.shape
        for key in shape.slot_keys:
            self._held.pop((key, pending.lease_id), None)
        call = scripts.undo_call(shape.rates, shape.slots, pending.lease_id, self._lease_ms, "", self._undone_ttl_ms,
                                 shape.quotas, pending.cost)
        self._undos[pending.lease_id] = (call, asyncio.get_running_loop().time() + self._lease)
        if now:
            self._flush_undos()

    def _flush_undos(self) -> None:
        """Send every pending undo (one at a time: the flush in flight takes the rest along)."""
        if self._undos and (self._undo_task is None or self._undo_task.done()) and not self._connection_closed:
            self._undo_task = asyncio.get_running_loop().create_task(self._send_undos(), name="redis-store-undo")
            self._tasks.add(self._undo_task)
            self._undo_task.add_done_callback(self._tasks.discard)

    def _prune_undos(self) -> None:
        now = asyncio.get_running_loop().time()
        expired = [lease_id for lease_id, (_, deadline) in self._undos.items() if deadline < now]
        for lease_id in expired:
            del self._undos[lease_id]
        if expired:
            log.warning("store could not undo %d admissions within a lease (their slots have expired)", len(expired))

    async def _send_undos(self) -> None:
        self._prune_undos()
        if not self._undos:
            return
        batch = list(self._undos.items())
        now = self._now()
        calls: list[Call] = []
        for _, ((keys, args), _) in batch:
            args = list(args)
            args[2] = now
            calls.append((keys, args))
        try:
            replies = await self._eval(self._undo_script, calls)
        except FAILURES:
            self._observer.store_error("release")
            return
        for (lease_id, _), reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                self._observer.store_error("release")
                if not rejected_for_its_keys(reply):
                    continue  # sent again with the next flush, until it lands or a lease has passed
                # Its keys hold what no script can use (another program's key): it would fail
                # the same way at every flush. What the admission left expires with its TTL.
            self._undos.pop(lease_id, None)

    # -- release -------------------------------------------------------------------------

    def release(
        self, slots: Sequence[SlotBucket], lease_id: str, wake: bool = False,
        *, settlement: Settlement | None = None,
    ) -> None:
        for slot in slots:  # (forget_leases, inlined: on every release)
            self._held.pop((slot.key, lease_id), None)
        if self._connection_closed:
            return
        if settlement is not None and settlement.settled != settlement.charged and (
            settlement.rates or settlement.quotas
        ):
            # One settle.lua call frees the slots and re-prices, in the release's own flush.
            keys, args = scripts.settle_call(slots, lease_id, bounded(settlement), self._now(), self._undone_ttl_ms,
                                             self._channels(slots) if wake else ())
            self._send_settle(keys, args, resent=False, reloads=0)
        elif slots:
            self._transport.release(list(map(_KEY, slots)), lease_members(lease_id),
                                    self._channels(slots) if wake else ())

    def _send_settle(self, keys: list[str], args: list[str | int], *, resent: bool, reloads: int,
                     waited: float = 0.0) -> None:
        generation = self._transport.scripts.generation
        self._transport.send_release_eval(
            self._settle_script, keys, args,
            functools.partial(self._settle_reply, keys, args, resent, reloads, generation, waited))

    def _settle_reply(self, keys: list[str], args: list[str | int], resent: bool, reloads: int,
                      generation: int, waited: float, reply: object) -> None:
        """settle.lua is idempotent by lease id: a lost connection sends it once more; one its
        migrating Cluster slot refused (not run) goes again after a pause, within a lease."""
        if not isinstance(reply, BaseException):
            return
        if reloads < 2 and self._transport.needs_reload(reply):
            self._spawn(self._reload_and_settle(keys, args, resent, reloads + 1, generation))
        elif isinstance(reply, ConnectionLost) and not resent and not self._connection_closed:
            self._send_settle(keys, args, resent=True, reloads=reloads)
        elif isinstance(reply, SlotMigrating) and waited < self._lease and not self._connection_closed:
            pause = min(max(2 * waited, 0.05), 1.0)
            self._spawn(self._settle_later(keys, args, resent, reloads, waited + pause, pause))
        else:
            self._observer.store_error("release")
            log.warning("store settlement failed (the charge stays at the route's price; its slots are "
                        "released on their own): %r", reply)
            self._release_unsettled(keys, args)

    def _release_unsettled(self, keys: list[str], args: list[str | int]) -> None:
        """A settlement given up: its slots are freed all the same, as a plain release (sent
        again until it lands), rather than held until the lease runs out."""
        slot_keys, lease_id, channels = scripts.settle_release(keys, args)
        if slot_keys and not self._connection_closed:
            self._transport.release(slot_keys, lease_members(lease_id), channels)

    async def _settle_later(self, keys: list[str], args: list[str | int], resent: bool, reloads: int,
                            waited: float, pause: float) -> None:
        await asyncio.sleep(pause)
        if not self._connection_closed:
            self._send_settle(keys, args, resent=resent, reloads=reloads, waited=waited)

    async def _reload_and_settle(self, keys: list[str], args: list[str | int], resent: bool, reloads: int,
                                 generation: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._transport.scripts.reload(generation)
        except FAILURES:
            self._observer.store_error("release")
            return
        self._send_settle(keys, args, resent=resent, reloads=reloads)

    def forget_leases(self, slots: Sequence[SlotBucket], lease_id: str) -> None:
        """Stop renewing `lease_id` in `slots` (released, or handed over to a job)."""
        for slot in slots:
            self._held.pop((slot.key, lease_id), None)

    def leave_queue(self, slots: Sequence[SlotBucket], waiter_id: str) -> None:
        if not slots or self._connection_closed:
            return
        keys = [key for slot in slots if not slot.shadow for key in scripts.queue_keys(slot.key)]
        self._transport.release(keys, lease_members(waiter_id), self._channels(slots))

    def _channels(self, slots: Sequence[SlotBucket]) -> list[str]:
        """The wake-up channels of `slots`' hash tags."""
        return [self._wakeups.channel(tag) for tag in {scripts.hash_tag(slot.key) for slot in slots}]

    def watch(self, slots: Sequence[SlotBucket], event: asyncio.Event) -> Callable[[], None]:
        return self._wakeups.watch({scripts.hash_tag(slot.key) for slot in slots}, event)

    @property
    def lease(self) -> float:
        return self._lease

    async def flush(self) -> None:
        """Wait until every release enqueued so far has been sent (or has failed)."""
        await self._transport.flush()

    # -- quotas --------------------------------------------------------------------------

    async def adjust_quota(self, quota: QuotaBucket, *, grant: int = 0, reset: bool = False) -> QuotaUsage:
        """Grant extra units for the current period and/or reset it (quota.lua); the new usage."""
        scripts.check_grant(grant)
        call: Call = ([quota.key], [self._now(), quota.period, grant, 1 if reset else 0])
        try:
            (reply,) = await self.run_script(self._quota_script, [call])
            return scripts.decode_quota(reply)
        except StoreError:
            self._observer.store_error("quota")
            raise

    # -- heartbeat -----------------------------------------------------------------------

    async def renew(self) -> int:
        """One heartbeat round: extend every lease this process holds; return (and report)
        how many were found lost. Raises StoreError when the round failed."""
        pairs = list(self._held)
        if not pairs:
            return 0
        groups: dict[str, list[tuple[str, str]]] = {}
        for pair in pairs:
            groups.setdefault(scripts.hash_tag(pair[0]), []).append(pair)
        chunks = [
            group[start : start + RENEW_CHUNK]
            for group in groups.values()
            for start in range(0, len(group), RENEW_CHUNK)
        ]
        now = self._now()
        calls = [scripts.renew_call(chunk, self._lease_ms, now) for chunk in chunks]
        try:
            replies = await self._eval(self._renew_script, calls, budget=max(self._timeout, self._lease / 6))
        except FAILURES as exc:
            self._observer.store_error("renew")
            raise StoreError(f"renew failed: {exc!r}") from exc
        lost = 0
        failed: BaseException | None = None
        for chunk, reply in zip(chunks, replies, strict=True):
            try:
                if isinstance(reply, BaseException):
                    raise reply
                positions = scripts.decode_renew(reply, len(chunk))
            except FAILURES as exc:
                failed = exc
                continue
            for position in positions:
                pair = chunk[position]
                if pair in self._held:  # else released meanwhile: not lost
                    del self._held[pair]
                    lost += 1
        if lost:
            self._observer.leases_lost(lost)
        if failed is not None:
            self._observer.store_error("renew")
            raise StoreError(f"renew partly failed: {failed!r}") from failed
        return lost

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await self.renew()
                self._prune_undos()
                if self._undos and await self._answers():
                    self._flush_undos()
            except StoreError as exc:
                log.warning("store heartbeat failed: %s", exc)
            except Exception:  # a bug must not stop the renewals of every lease
                log.exception("store heartbeat crashed")

    async def _answers(self) -> bool:
        """Does Redis answer a PING within the budget? (Undos wait for that after a timeout.)"""
        try:
            async with asyncio.timeout(self._timeout):
                await self._transport.ping()
                return True
        except FAILURES:
            return False

    # -- other scripts (bans, jobs) ----------------------------------------------------------

    def now_arg(self) -> str:
        """The "now" ARGV this store sends its scripts (empty: Redis TIME)."""
        return self._now()

    async def run_script(self, script: scripts.Script, calls: list[Call]) -> list[Any]:
        """EVALSHA `calls` of another script as one pipeline on this store's connection, within
        its budget (loaded on first use and on NOSCRIPT). Replies in order; a call answered with
        an error gets the exception as its reply. Raises StoreError when the pipeline failed as
        a whole; not reported to the observer: the caller counts it under its own operation."""
        if self._connection_closed:
            raise StoreError("store is closed")
        self._transport.scripts.add(script)
        try:
            return await self._eval(script, calls)
        except FAILURES as exc:
            raise StoreError(f"{script.name} failed: {exc!r}") from exc

    # -- plumbing --------------------------------------------------------------------------

    def _now(self) -> str:
        return scripts.now_arg(self._clock() if self._clock is not None else None)

    async def _eval(self, script: scripts.Script, calls: list[Call], *, budget: float | None = None) -> list[Any]:
        """EVALSHA every call through the transport. Calls refused unrun go again once there;
        nothing that may have run is sent again (ConnectionLost is raised)."""
        return await self._transport.eval_batch(script, calls, budget=budget or self._timeout)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

