"""Bounds on open client connections, per worker process: per client address and in all.

A connection costs a file descriptor from its accept, before it sends a byte, and the head
deadline (gateway/header_deadline.py) bounds how long an idle one lasts, not how many there are.
One client opening idle connections as fast as it could reached the process's open-file limit
within seconds: from then on every other client's connection was reset at the accept, and the
gateway's own connections (a new upstream connection, a Redis reconnect) could not open. So:

- `max_connections_per_client`: the connections one client address may hold. An IPv6 client
  counts by its `bans.ipv6_prefix` (/64 by default), as bans count it: one host holds the whole
  prefix. Peers in `identity.trusted_proxies` are counted only in all: they carry many clients.
  By default 512, or twice the largest concurrency limit a key can hold (`default_per_client`
  in the config model, which also refuses a lower configured value): a client using every slot
  its headers offer is never refused a connection.
- `max_client_connections`: every client together. By default the open-file limit less what
  the gateway keeps for its own descriptors (`default_total`), so that the limit is reached
  here, with an answer, and never at the accept, where the kernel's and the gateway's own
  connections fail with it.

A connection over either gets `503` with the JSON body (`too_many_connections` /
`connection_limit`, `Retry-After: 1`) and is closed: nothing is parsed, no key is checked, no
store is called. The answer waits for the client's first bytes (up to `REFUSAL_LINGER`): a
socket closed with an unread request is reset by the kernel, and the client would see a reset
instead of the 503. At most `MAX_LINGERING` refused connections wait so at once; past that, a
refused connection is answered and closed at its accept.

The census is counts only (no I/O, no clock); `ConnectionGuard` is one listening server's
door to it: the limits in force (read per connection, so a reload applies to the next), the
metrics, and a log line at most every `LOG_EVERY` seconds however many are refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass

from gateway.admission.bans import group_of
from gateway.config.model import Config, Network, default_per_client
from gateway.responses import closing_error

log = logging.getLogger("gateway.client")

PER_CLIENT = "per_client"
TOTAL = "total"
LIMITS = (PER_CLIENT, TOTAL)

REFUSAL_LINGER = 1.0  # seconds a refused connection waits for the request it will not serve
MAX_LINGERING = 128  # refused connections waiting at once; inside RESERVED_DESCRIPTORS
# Descriptors kept for the gateway besides the upstream pool: the store's connections, the
# admin port's (`ADMIN_CONNECTIONS`), refusals lingering, the listening sockets, the event
# loop's own, log files.
RESERVED_DESCRIPTORS = 512
ADMIN_CONNECTIONS = 128  # the admin port's own bound (Prometheus, probes, an operator)
LOG_EVERY = 10.0
MAX_OPEN_FILES = 1 << 20  # Linux's default fs.nr_open: what an unlimited hard limit means here


REFUSALS = {
    PER_CLIENT: closing_error(503, "Service Unavailable", "too_many_connections",
                              "This client address holds too many open connections to the gateway; "
                              "reuse them, or close some.", retry_after=1),
    TOTAL: closing_error(503, "Service Unavailable", "connection_limit",
                         "The gateway holds as many client connections as it can; retry.", retry_after=1),
}


def default_total(open_file_limit: int, upstream_pool: int) -> int:
    """`max_client_connections` when unset. Each client connection may need an upstream
    connection while it is served, up to the pool's size: the client connections and the pool
    share what `RESERVED_DESCRIPTORS` leaves."""
    free = open_file_limit - RESERVED_DESCRIPTORS
    return max(free - upstream_pool, free // 2, 1)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    total: int  # client connections open at once
    per_client: int  # of them from one client address or IPv6 prefix
    uncounted: tuple[Network, ...] = ()  # peers counted only in the total (trusted proxies)
    ipv6_prefix: int = 64

    @classmethod
    def from_config(cls, config: Config, default: int) -> ConnectionLimits:
        """The public port's limits; `default` stands for an unset `max_client_connections`."""
        return cls(
            total=config.max_client_connections or default,
            per_client=config.max_connections_per_client or default_per_client(config),
            uncounted=config.identity.trusted_proxies,
            ipv6_prefix=config.bans.ipv6_prefix if config.bans is not None else 64,
        )


def client_group(peer: str | None, limits: ConnectionLimits) -> str:
    """The name a peer is counted under per client; "" when it is counted only in the total
    (no address, as on a Unix socket, or a trusted proxy)."""
    if peer is None:
        return ""
    if not limits.uncounted and ":" not in peer:
        return peer  # IPv4, the common case, without parsing
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if any(ip in network for network in limits.uncounted):
        return ""
    return group_of(ip, limits.ipv6_prefix)


class OverLimit(Exception):
    def __init__(self, limit: str) -> None:
        super().__init__(limit)
        self.limit = limit  # PER_CLIENT or TOTAL


class ConnectionCensus:
    """Open connections in all and by client group. `_by_client` holds only groups with an
    open connection, so it is bounded by the total."""

    def __init__(self) -> None:
        self.open = 0
        self.lingering = 0  # refused connections waiting for their request (never counted in `open`)
        self._by_client: dict[str, int] = {}

    def enter(self, group: str, limits: ConnectionLimits) -> None:
        """Count a new connection of `group`; raises OverLimit, counting nothing, when it is one
        too many."""
        if self.open >= limits.total:
            raise OverLimit(TOTAL)
        if group:
            held = self._by_client.get(group, 0)
            if held >= limits.per_client:
                raise OverLimit(PER_CLIENT)
            self._by_client[group] = held + 1
        self.open += 1

    def leave(self, group: str) -> None:
        """A connection counted by `enter` with this group has closed."""
        self.open -= 1
        if group:
            held = self._by_client[group] - 1
            if held:
                self._by_client[group] = held
            else:
                del self._by_client[group]

    def held_by(self, group: str) -> int:
        return self._by_client.get(group, 0)


class ConnectionGuard:
    """One listening server's connection bounds (see the module's doc)."""

    def __init__(
        self,
        limits: Callable[[], ConnectionLimits],
        *,
        name: str = "public",
        on_open: Callable[[int], None] | None = None,  # +1 / -1: the open-connections gauge
        on_refused: Callable[[str], None] | None = None,  # PER_CLIENT or TOTAL: the refusals counter
    ) -> None:
        self.limits = limits
        self.census = ConnectionCensus()
        self._name = name
        self._on_open = on_open
        self._on_refused = on_refused
        self._refused = dict.fromkeys(LIMITS, 0)  # since the last log line
        self._last_refused_group = ""
        self._logged_at: float | None = None
        self._log_due: asyncio.TimerHandle | None = None

    def enter(self, peer: str | None) -> str:
        """Count a connection from `peer`; returns its group for `leave`. Raises OverLimit."""
        limits = self.limits()
        group = client_group(peer, limits)
        try:
            self.census.enter(group, limits)
        except OverLimit as over:
            self._refused[over.limit] += 1
            if over.limit == PER_CLIENT:
                self._last_refused_group = group
            if self._on_refused is not None:
                self._on_refused(over.limit)
            raise
        if self._on_open is not None:
            self._on_open(1)
        return group

    def leave(self, group: str) -> None:
        self.census.leave(group)
        if self._on_open is not None:
            self._on_open(-1)

    def may_linger(self) -> bool:
        """Whether one more refused connection may wait for its request (then it counts as
        lingering until it closes: `lingered`)."""
        if self.census.lingering >= MAX_LINGERING:
            return False
        self.census.lingering += 1
        return True

    def lingered(self) -> None:
        self.census.lingering -= 1

    def log_refusals(self, loop: asyncio.AbstractEventLoop) -> None:
        """A warning for the refusals so far, at most one every LOG_EVERY seconds (a flood of
        connections must not flood the log as well); those within that time are summed up in
        the next line, written when it is due."""
        if self._log_due is not None:
            return  # a line is already due, and will count this refusal too
        now = loop.time()
        if self._logged_at is None or now - self._logged_at >= LOG_EVERY:
            self._write_log(loop)
        else:
            self._log_due = loop.call_at(self._logged_at + LOG_EVERY, self._write_log, loop)

    def flush_log(self, loop: asyncio.AbstractEventLoop) -> None:
        """The summary line that is due, now: at exit, the last period's refusals are written
        too, not lost with the timer."""
        if self._log_due is not None:
            self._log_due.cancel()
            self._write_log(loop)

    def _write_log(self, loop: asyncio.AbstractEventLoop) -> None:
        self._log_due = None
        refused = self._refused
        since = "" if self._logged_at is None else f" in the last {loop.time() - self._logged_at:.0f} s"
        self._logged_at = loop.time()
        self._refused = dict.fromkeys(LIMITS, 0)
        limits = self.limits()
        log.warning(
            "%s port: refused %d connection(s)%s: %d with all its %d client connections open, %d from "
            "a client address holding its %d (the last: %s); %d open now",
            self._name, refused[TOTAL] + refused[PER_CLIENT], since, refused[TOTAL], limits.total,
            refused[PER_CLIENT], limits.per_client, self._last_refused_group or "-", self.census.open,
        )


def raise_open_file_limit() -> int:
    """The soft open-file limit raised to the hard one (as Go's runtime does at start: the soft
    1024 of many systems would bound the gateway far below what the kernel allows); returns the
    limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else MAX_OPEN_FILES
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # kept as it is: the default total follows it
    return open_file_limit()


def open_file_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else MAX_OPEN_FILES


ADMIN_LIMITS = ConnectionLimits(total=ADMIN_CONNECTIONS, per_client=ADMIN_CONNECTIONS)


def limits_following(running: Callable[[], Config], default: int) -> Callable[[], ConnectionLimits]:
    """The public port's limits of the config in force, made once per config."""
    made: list[tuple[Config, ConnectionLimits]] = []

    def limits() -> ConnectionLimits:
        config = running()
        if not made or made[0][0] is not config:
            made[:] = [(config, ConnectionLimits.from_config(config, default))]
        return made[0][1]

    return limits
