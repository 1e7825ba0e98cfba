"""IP bans, the pure part: what one ban covers, how long it lasts, who is exempt, and the
local cache of bans a replica knows about.

A ban covers a *group*: an IPv4 address, or the IPv6 prefix of `bans.ipv6_prefix` bits
(one /64 is usually one customer or one machine, and an attacker gets a whole /64 for
free). IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports) is unwrapped
first, or every IPv4 client would land in one /64.

Escalation: the n-th ban while past bans are remembered lasts
`min(duration * factor**(n-1), max_duration)`. The store scripts apply the same formula;
`ban_ms` is the reference the tests hold them to.

Strikes, and what is one (docs/behaviour.md "What gets banned"): a 401 always; a 429 only when
the client *ignored the signals*, i.e. came back before the wait it was told. The gateway
cannot tell one client's threads apart, so `ReturnLedger` keeps, per (group, key, route,
kind of limit), the moments until which the refused requests were told to stay away, and
calls a refusal early when `tolerance` of those are still running: a client with at most
`tolerance` threads (or connections) that each wait as told never gets there, since a thread
coming back has seen its own wait end.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.admission.identity import is_trusted
from gateway.config.model import Network
from gateway.store.ban_lengths import StrikeCounts as StrikeCounts  # in STRIKE_KINDS order
from gateway.store.ban_lengths import ban_ms as ban_ms  # re-exported: the reference for the scripts
from gateway.store.ban_lengths import ms as ms

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The kinds of strike, in the order the stores count them (bounded: they are metric labels).
UNAUTHORIZED, RATE, CONCURRENCY = 0, 1, 2
STRIKE_KINDS = ("unauthorized", "rate", "concurrency")

# A told wait is taken as this much shorter: the clock is read before the answer is sent,
# and a client's timer may round a little short.
RETURN_SLACK = 0.02
# The first refusals of a scope after it was quiet (no refusal for the ban window, `within`)
# are never early for this long: a burst of first attempts (a client that has not read one
# answer yet, so cannot size its pool by `Concurrency-Limit`) is not a client coming back.
FIRST_BURST = 0.5


def group_of(ip: IPAddress, ipv6_prefix: int) -> str:
    """The name of the group a ban on `ip` covers: `1.2.3.4`, or `2001:db8:a::/64`
    (a full-length prefix names the address itself)."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ipv6_prefix >= 128:
            return str(ip)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


def parse_group(text: str, ipv6_prefix: int) -> str | None:
    """The group named by an admin's `{ip}`: an address (its group), or an IPv6 prefix of
    exactly `ipv6_prefix` bits, as `GET /v1/bans` lists it. None for anything else: any other
    prefix length names no one group (`203.0.113.7/24` is not the ban on 203.0.113.0)."""
    text = text.strip()
    try:
        if "/" not in text:
            return group_of(ipaddress.ip_address(text.strip("[]")), ipv6_prefix)
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if network.version != 6 or network.prefixlen != ipv6_prefix:
        return None
    return group_of(network.network_address, ipv6_prefix)


def is_exempt(ip: IPAddress, allow: Sequence[Network]) -> bool:
    """True when `ip` lies in one of the `bans.allow` networks: never banned."""
    return is_trusted(ip, allow)




def retry_after(seconds_left: float) -> int:
    """The `Retry-After` of a ban with this long left: whole seconds, never early, at least 1."""
    return max(1, math.ceil(seconds_left))


@dataclass(slots=True)
class _Known:
    until: float  # on the cache's clock
    bans: int
    learned: float
    unconfirmed: bool = False  # imposed by this replica, not yet seen in the store's index


@dataclass(frozen=True, slots=True)
class KnownBan:
    group: str
    seconds_left: float
    bans: int


class BanCache:
    """The bans this replica knows about: group → until, on a monotonic clock.

    Filled by the replica's own strikes as soon as the store answers, and replaced by the
    store's list of active bans at every sync. A sync reply was read at some instant while
    local news may have arrived since: entries learned after the sync began are kept, and
    bans lifted here after it began are not brought back. A ban this replica imposed is kept
    until it ends or a sync has seen it in the index (its index write may have failed): the
    replica never lets a client it banned back in early.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._known: dict[str, _Known] = {}
        self._lifted: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._known)

    def __bool__(self) -> bool:
        return bool(self._known)

    def now(self) -> float:
        return self._clock()

    def seconds_left(self, group: str) -> float | None:
        """Seconds until the ban on `group` ends, or None when it is not banned."""
        known = self._known.get(group)
        if known is None:
            return None
        left = known.until - self._clock()
        if left <= 0:
            del self._known[group]
            return None
        return left

    def learn(self, group: str, seconds_left: float, bans: int, *, imposed: bool = False) -> None:
        """Know a ban; `imposed` when this replica's own strike imposed it."""
        now = self._clock()
        self._known[group] = _Known(now + seconds_left, bans, now, imposed)
        self._lifted.pop(group, None)

    def lift(self, group: str) -> None:
        self._known.pop(group, None)
        self._lifted[group] = self._clock()

    def replace(self, active: Iterable[KnownBan], sync_started: float) -> None:
        """Take the store's list of active bans, read by a sync that began at `sync_started`."""
        now = self._clock()
        active = list(active)
        listed = {ban.group for ban in active}
        known = {
            group: entry
            for group, entry in self._known.items()
            if entry.until > now and (entry.learned >= sync_started or entry.unconfirmed)
        }
        for group in listed.intersection(known):
            known[group].unconfirmed = False  # the index has it: from now on the index decides
        for ban in active:
            lifted = self._lifted.get(ban.group)
            if (lifted is not None and lifted >= sync_started) or ban.group in known:
                continue
            known[ban.group] = _Known(now + ban.seconds_left, ban.bans, sync_started)
        self._known = known
        self._lifted = {group: at for group, at in self._lifted.items() if at >= sync_started}

    def snapshot(self) -> list[KnownBan]:
        now = self._clock()
        return [
            KnownBan(group, entry.until - now, entry.bans)
            for group, entry in self._known.items()
            if entry.until > now
        ]


def total(counts: StrikeCounts) -> int:
    return counts[0] + counts[1] + counts[2]


def add_counts(a: StrikeCounts, b: StrikeCounts) -> StrikeCounts:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def one_strike(kind: int) -> StrikeCounts:
    return (1, 0, 0) if kind == UNAUTHORIZED else (0, 1, 0) if kind == RATE else (0, 0, 1)


class _Scope:
    """One (group, scope)'s told waits (their ends, a heap of the `tolerance` latest) and when
    its current streak of refusals began and last saw one."""

    __slots__ = ("waits", "since", "last")

    def __init__(self, now: float) -> None:
        self.waits: list[float] = []
        self.since = now
        self.last = now


class ReturnLedger:
    """When may this client come back: for each (group, scope) the ends of the waits it was
    told, the `tolerance` latest only (that is all the rule needs).

    `refused(...)` records one refusal told to wait `told` seconds and answers whether it was
    early: `tolerance` told waits of the same scope were still running. Clients with at most
    `tolerance` threads that each honour their own wait are never early, whatever order
    their requests interleave in (each running wait belongs to another thread). A client that
    returns at r requests per second against a told wait w holds about r * w running waits,
    so it is early from r > tolerance / w on. Except in the first `FIRST_BURST` seconds of a
    streak (refusals of the scope after `quiet` seconds without one): a client's first burst,
    sent before it could read any answer, may be any size, and is not a return.

    Bounded: at most `max_entries` scopes of at most `tolerance` floats; past that, scopes
    with no running wait go first, then the oldest quarter (so the scan is rare). Forgetting
    a scope only forgives: it never makes a refusal early.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._scopes: dict[tuple[str, str], _Scope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    def refused(self, group: str, scope: str, told: float, tolerance: int, quiet: float = 60.0) -> bool:
        now = self._clock()
        key = (group, scope)
        entry = self._scopes.pop(key, None)  # re-inserted last: the oldest scopes go first
        if entry is None:
            if len(self._scopes) >= self._max_entries:
                self._make_room(now)
            entry = _Scope(now)
        elif now - entry.last >= quiet:
            entry.since = now  # a new streak
        entry.last = now
        waits = entry.waits
        while waits and waits[0] <= now:
            heapq.heappop(waits)
        early = len(waits) >= tolerance and (tolerance == 0 or now - entry.since >= FIRST_BURST)
        end = now + max(0.0, told - RETURN_SLACK)
        if len(waits) < tolerance:
            heapq.heappush(waits, end)
        elif waits and end > waits[0]:
            heapq.heapreplace(waits, end)
        self._scopes[key] = entry
        return early

    def _make_room(self, now: float) -> None:
        live = {key: entry for key, entry in self._scopes.items() if entry.waits and max(entry.waits) > now}
        if len(live) >= self._max_entries:
            live = dict(list(live.items())[len(live) // 4:])
        self._scopes = live
