"""One pipelined connection to a standalone Redis: the admission fast path.

Why not redis-py here: its asyncio pipeline costs a task, a pool checkout, a lock and several
layers of Python per batch. At low load, where every admission is a batch of one, that was
about 400 CPU-µs per request, more than the whole proxy (docs/benchmarks.md). Here a command
is packed once (hiredis), every command queued during one loop iteration goes out in one
write, and replies are parsed by hiredis in `data_received` and handed, in order, to the
callback each command came with: Redis answers one connection's commands in the order it
read them. No task, no pool, no lock per call. Ordering is also a guarantee callers use: a
release queued before an admission is applied by Redis before it.

Failure model. Every command has a deadline, `timeout` after it was queued. When the oldest
unanswered command is overdue, the connection is declared stalled, every unanswered command
is answered with a StoreError, and the connection is closed; the next command opens a new
one. Replies are dispatched from `data_received` itself, and both asyncio's loop and uvloop
read ready sockets before they run the next due timers, so a reply that arrived in time but
sat unread while the loop was busy (saturation, a long callback) is delivered, not mistaken
for a Redis stall (with redis-py, the reply also had to wait for its task to be scheduled,
and the timeout often won). A lost connection or a failed connect answers the same way. Nothing is retried here
(only the caller knows whether a retry is safe) but the releases `release` queued: a ZREM is
idempotent, and one that did not land is sent again until it does or a lease has passed
(_zrem_failed).

Used for `redis://` and `unix://` store URLs (TLS, Sentinel and Cluster keep redis-py,
gateway/store/redis_client.py). Both implement gateway/store/transport.py; here `send_eval`
and `release` are `send` itself (one packed command, one callback): no task per call, and
the connection's order is the release-before-admission guarantee.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import hiredis

from gateway.config.store_url import StoreUrlError, parse_redis_url
from gateway.store.base import StoreError
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
)

log = logging.getLogger(__name__)

ReplyError = hiredis.ReplyError
Arg = str | bytes | int | float


def pack_command(args: tuple[Arg, ...]) -> bytes:
    """One command in RESP, packed by hiredis (C)."""
    return hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub declares a 1-tuple


# ZREM formats kept per slot key (PipelinedRedis._zrem_formats), and the member's marker.
MAX_ZREM_FORMATS = 4096
_MEMBER = "\x00member\x00"

# A hole's bulk string in a command format: its length, then its bytes.
_HOLE = b"$%d\r\n%b\r\n"


def command_format(args: tuple[Arg, ...], holes: Sequence[str]) -> bytes:
    """`pack_command(args)` as a bytes %-format with each of `holes` (marker arguments, each
    in `args` once, in this order) left open: `format % (len(v1), v1, len(v2), v2, ...)`, each
    vi bytes, equals pack_command of `args` with the holes replaced by the vi. Packed once per
    command shape, so a hot command that varies in a few arguments costs one % (fill)."""
    packed = pack_command(args).replace(b"%", b"%%")
    start = 0
    for hole in holes:
        bulk = pack_command((hole,)).partition(b"\r\n")[2]  # "$<len>\r\n<hole>\r\n"
        at = packed.find(bulk, start)
        if at < 0 or packed.find(bulk, at + len(bulk)) >= 0:
            raise ValueError(f"hole {hole!r} is not in the command exactly once, after the previous one")
        packed = packed[:at] + _HOLE + packed[at + len(bulk):]
        start = at + len(_HOLE)
    return packed


def fill(command: bytes, *values: bytes) -> bytes:
    """A `command_format` with its holes filled (the admission hot path inlines this %)."""
    return command % tuple(part for value in values for part in (len(value), value))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a standalone Redis listens and how to log in: parsed from the store URL."""

    host: str | None
    port: int
    path: str | None  # a unix socket instead of host:port
    db: int
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> Endpoint | None:
        """The endpoint of a plain `redis://` or `unix://` URL; None for anything else (TLS,
        Sentinel, Cluster, options this client does not implement, a URL the store refuses).
        Parsed by `parse_redis_url`, as the config loader and redis-py's client see it."""
        try:
            target = parse_redis_url(url)
        except StoreUrlError:
            return None
        if target.scheme not in ("redis", "unix") or target.options:
            return None  # e.g. client_name: redis-py honours it, this client would not
        if target.socket_path is not None:
            return cls(None, 0, target.socket_path, target.db, target.username, target.password)
        ((host, port),) = target.nodes
        return cls(host, port, None, target.db, target.username, target.password)


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedRedis) -> None:
        self._owner = owner
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._owner._received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connection_failed(self, ConnectionLost(f"Redis connection lost: {exc!r}" if exc else
                                                            "Redis closed the connection"))


class PipelinedRedis(Transport):
    """Queue commands with `send`; each callback gets its reply (or a ReplyError /
    StoreError instance, never raised) exactly once."""

    def __init__(self, endpoint: Endpoint, *, timeout: float) -> None:
        self.scripts = ScriptSet(self._load_all)
        self._endpoint = endpoint
        self._timeout = timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._outgoing: list[bytes] = []
        # Sent or queued, unanswered: (deadline, callback), oldest first.
        self._waiting: collections.deque[tuple[float, OnReply]] = collections.deque()
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self.on_release_error = ignore
        self._release_failures_logged = False
        # ZREMs sent (by `release`) and not yet answered, oldest first (see _zrem_reply), and
        # each slot key's ZREM packed once (command_format), the member left open.
        self._zrems: collections.deque[bytes] = collections.deque()
        self._zrem_formats: dict[str, bytes] = {}
        # ZREMs that did not land, since when (loop time), sent again until they do or
        # `release_retry_for` has passed (_zrem_failed); the next try, and the pause before it.
        self._lost: dict[bytes, float] = {}
        self._resending: set[bytes] = set()  # of those, sent again and not answered yet
        self._retry: asyncio.TimerHandle | None = None
        self._retry_pause = RELEASE_RETRY_PAUSE

    # -- sending -----------------------------------------------------------------------

    def send(self, command: bytes, on_reply: OnReply) -> None:
        """Queue one packed command (`pack_command`); it goes out with the rest of this loop
        iteration's commands."""
        if self._closed:
            on_reply(StoreError("store is closed"))
            return
        loop = asyncio.get_running_loop()
        self._outgoing.append(command)
        self._waiting.append((loop.time() + self._timeout, on_reply))
        if self._protocol is None:
            if self._connecting is None:
                self._connecting = loop.create_task(self._connect(), name="redis-pipelined-connect")
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._arm(loop)

    async def call(self, *args: Arg) -> object:
        """Send one command and wait for its reply (errors come back as values)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        def answer(reply: object) -> None:
            if not future.done():
                future.set_result(reply)

        self.send(pack_command(args), answer)
        return await future

    # -- the Transport interface --------------------------------------------------------

    def send_eval(self, script: Script, keys: list[str], args: list[str | int], on_reply: OnReply) -> None:
        self.send(pack_command(("EVALSHA", script.sha, len(keys), *keys, *args)), on_reply)

    def send_release_eval(self, script: Script, keys: list[str], args: list[str | int], on_reply: OnReply) -> None:
        self.send_eval(script, keys, args, on_reply)  # one connection: in order with everything

    def eval_format(self, script: Script, keys: list[str], args: list[str | int], holes: Sequence[str]) -> bytes:
        return command_format(("EVALSHA", script.sha, len(keys), *keys, *args), holes)

    send_packed = send

    def needs_reload(self, reply: object) -> bool:
        return isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT")

    def release(self, keys: Sequence[str], members: Sequence[str], channels: Sequence[str]) -> None:
        # The common case, one member: each key's ZREM packed once, filled with the member.
        member = members[0].encode() if len(members) == 1 else None
        for key in keys:
            zrem = self._zrem_formats.get(key) if member is not None else None
            command = zrem % (len(member), member) if zrem is not None else self._pack_zrem(key, members)
            self._zrems.append(command)
            self.send(command, self._zrem_reply)
        for channel in channels:  # the same connection: published after the ZREMs have landed
            self.send(pack_command(("PUBLISH", channel, "1")), self._release_reply)

    def _pack_zrem(self, key: str, members: Sequence[str]) -> bytes:
        """ZREM `members` from `key`, packed whole; a key's first single-member ZREM also keeps
        its format for the next ones."""
        if len(members) == 1:
            with contextlib.suppress(ValueError):  # (the key holds the marker's bulk string: not kept)
                zrem = command_format(("ZREM", key, _MEMBER), (_MEMBER,))
                if len(self._zrem_formats) >= MAX_ZREM_FORMATS:
                    del self._zrem_formats[next(iter(self._zrem_formats))]  # the oldest (FIFO)
                self._zrem_formats[key] = zrem
        return pack_command(("ZREM", key, *members))

    def _zrem_reply(self, reply: object) -> None:
        # Callbacks run once each, in the order their commands were queued (one connection
        # answers in order; a failure answers everything waiting in order): this reply's
        # command is the oldest in _zrems.
        command = self._zrems.popleft()
        if isinstance(reply, BaseException):
            self._zrem_failed(command, reply)
        else:
            self._release_reply(reply)

    def _zrem_failed(self, command: bytes, reply: BaseException) -> None:
        """A ZREM that did not land (Redis down, stalled, restarting, a failover) is sent again,
        until it lands or `release_retry_for` has passed (the lease: by then its slot, never
        renewed, has expired). Otherwise the slot would look held until then, and clients within
        their limit would get 429s. ZREM is idempotent and a lease id is never reused: sending
        one twice frees nothing else. After a lost connection it goes once more at once (on the
        next connection); otherwise after a pause, all of them together."""
        if self._closed or not release_can_land(reply):
            self._release_reply(reply)
            return
        now = asyncio.get_running_loop().time()
        since = self._lost.get(command)
        if since is None:  # its first failure
            self._lost[command] = now
            if isinstance(reply, ConnectionLost):
                self._resend(command)
                return
        elif now - since > self.release_retry_for:
            del self._lost[command]  # given up: its lease has expired by now
            self._release_reply(reply)
            return
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(self._retry_pause, self._resend_lost)
            self._retry_pause = min(2 * self._retry_pause, RELEASE_RETRY_PAUSE_MAX)
        self._release_reply(reply)  # counted; logged once per streak

    def _resend_lost(self) -> None:
        self._retry = None
        for command in list(self._lost):
            if command not in self._resending:
                self._resend(command)

    def _resend(self, command: bytes) -> None:
        self._resending.add(command)
        self.send(command, functools.partial(self._resent_reply, command))

    def _resent_reply(self, command: bytes, reply: object) -> None:
        self._resending.discard(command)
        if isinstance(reply, BaseException):
            self._zrem_failed(command, reply)
            return
        self._lost.pop(command, None)
        self._retry_pause = RELEASE_RETRY_PAUSE
        self._release_reply(reply)

    def _release_reply(self, reply: object) -> None:
        if not isinstance(reply, BaseException):
            if self._release_failures_logged:  # the streak's end, said as redis_client.py says it
                self._release_failures_logged = False
                log.info("store releases land again")
            return
        self.on_release_error()
        if not self._release_failures_logged:  # once per outage, not once per lease
            self._release_failures_logged = True
            log.warning("store releases are failing (each is sent again until it lands or a lease has passed): %s",
                        reply)

    async def flush(self) -> None:
        if self._waiting:
            await self.call("PING")  # one connection, in order: everything before it is done

    async def zrem(self, key: str, member: str, *, budget: float) -> None:
        # No timer of its own: every command here has its deadline (`timeout`).
        reply = await self.call("ZREM", key, member)
        if isinstance(reply, BaseException):
            raise reply

    async def eval_batch(self, script: Script, calls: Sequence[Call], *, budget: float) -> list[object]:
        """Every call in the same write (each command's deadline is `timeout` after it was
        queued); NOSCRIPT: the shared reload (within `budget`), then once more."""
        generation = self.scripts.generation

        async def one(keys: list[str], args: list[str | int]) -> object:
            reply = await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                async with asyncio.timeout(budget):
                    await self.scripts.reload(generation)
                reply = await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
            if isinstance(reply, StoreError):  # lost, or past its deadline (one instance per caller)
                raise type(reply)(*reply.args) from reply
            return reply

        return list(await asyncio.gather(*(one(keys, args) for keys, args in calls)))

    async def _load_all(self, scripts: Sequence[Script]) -> Sequence[object]:
        # In one write, ahead of whatever is queued after it on this (ordered) connection.
        return await asyncio.gather(*(self.call("SCRIPT", "LOAD", script.source) for script in scripts))

    async def ping(self) -> None:
        reply = await self.call("PING")
        if isinstance(reply, BaseException):
            raise reply

    def _flush(self) -> None:
        self._flush_scheduled = False
        protocol = self._protocol
        if protocol is None or protocol.transport is None or not self._outgoing:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        protocol.transport.write(data)

    # -- replies -----------------------------------------------------------------------

    def _received(self, protocol: _Protocol, data: bytes) -> None:
        """Parse what arrived and hand each reply to its command's callback, in order (one
        call per read, not per reply)."""
        reader = protocol.reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._connection_failed(protocol, ConnectionLost(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if protocol is not self._protocol or not self._waiting:
                continue  # a late reply on a connection already given up
            _, on_reply = self._waiting.popleft()
            try:
                on_reply(reply)
            except Exception:  # a bug in one caller must not desynchronise everyone else's replies
                log.exception("a Redis reply callback failed")

    def _fail_all(self, error: StoreError) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        self._outgoing.clear()
        for _, on_reply in waiting:
            try:
                on_reply(error)
            except Exception:
                log.exception("a Redis reply callback failed")

    # -- connection ----------------------------------------------------------------------

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        endpoint = self._endpoint
        try:
            async with asyncio.timeout(self._timeout):
                if endpoint.path is not None:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), endpoint.path)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self), endpoint.host or "localhost", endpoint.port)
        except (OSError, TimeoutError) as exc:
            self._connecting = None
            self._fail_all(ConnectionLost(f"cannot connect to Redis: {exc!r}"))
            return
        except BaseException:
            self._connecting = None
            self._fail_all(StoreError("Redis connect cancelled"))
            raise
        self._connecting = None
        sock = protocol.transport.get_extra_info("socket") if protocol.transport is not None else None
        if sock is not None and endpoint.path is None:
            with contextlib.suppress(OSError):  # as redis-py does: the kernel notices a dead peer when idle
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._closed:
            if protocol.transport is not None:
                protocol.transport.close()
            return
        self._protocol = protocol
        # Log in first, in the same write as whatever queued while connecting. A refused login
        # fails the connection: the commands behind it are answered NOAUTH (as errors) anyway.
        handshake: list[bytes] = []
        if endpoint.password is not None:
            handshake.append(pack_command(("AUTH", endpoint.username, endpoint.password) if endpoint.username
                                          else ("AUTH", endpoint.password)))
        if endpoint.db:
            handshake.append(pack_command(("SELECT", endpoint.db)))
        deadline = loop.time() + self._timeout
        for command in reversed(handshake):
            self._outgoing.insert(0, command)
            self._waiting.appendleft((deadline, self._handshake_reply))
        self._flush()

    def _handshake_reply(self, reply: object) -> None:
        if isinstance(reply, (ReplyError, StoreError)):
            # Never the password: only Redis's own words, which do not repeat it.
            protocol = self._protocol
            if protocol is not None:
                # Redis greets a connection over `maxclients` with this error before reading a
                # command: the first reply we read, though no fault of the login's.
                what = "the connection" if "max number of clients" in str(reply) else "the login or SELECT"
                self._connection_failed(protocol, StoreError(f"Redis refused {what}: {reply}"))

    def _connection_failed(self, protocol: _Protocol, error: StoreError) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if protocol.transport is not None:
            protocol.transport.close()
        self._fail_all(error)

    # -- deadlines ---------------------------------------------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._waiting:
            self._watchdog = loop.call_at(self._waiting[0][0], self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        loop = asyncio.get_running_loop()
        if not self._waiting:
            return
        if self._waiting[0][0] > loop.time():
            self._arm(loop)
            return
        protocol = self._protocol
        error = StoreError(f"Redis did not answer within {self._timeout:g}s")
        if protocol is not None:
            self._connection_failed(protocol, error)
        else:
            self._fail_all(error)  # still connecting: the connect's own timeout ends it too

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing unanswered."""
        return not self._waiting

    async def aclose(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._lost.clear()
        self._resending.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None:
            self._connecting.cancel()
            try:
                await self._connecting
            except (asyncio.CancelledError, Exception):
                pass
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._fail_all(StoreError("store is closed"))
