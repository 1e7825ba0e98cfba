"""IP bans, the pure part: what one ban covers, how long it lasts, who is exempt, and the
local cache of bans a replica knows about.

A ban covers a *group*: an IPv4 address, or the IPv6 prefix of `bans.ipv6_prefix` bits
(one /64 is usually one customer or one machine, and an attacker gets a whole /64 for
free). IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports) is unwrapped
first, or every IPv4 client would land in one /64.

Escalation: the n-th ban while past bans are remembered lasts
`min(duration * factor**(n-1), max_duration)`. The store scripts apply the same formula;
`ban_ms` is the reference the tests hold them to.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.admission.identity import is_trusted
from gateway.config.model import Bans, Network
from gateway.store.ban_lengths import ban_ms as ban_ms  # re-exported: the reference for the scripts
from gateway.store.ban_lengths import ms as ms

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
    """The group named by an admin's `{ip}`: an address, or an IPv6 prefix (`2001:db8:a::/64`,
    any address inside it works too). None when it is neither."""
    text = text.strip()
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)
            return group_of(network.network_address, ipv6_prefix)
        return group_of(ipaddress.ip_address(text.strip("[]")), ipv6_prefix)
    except ValueError:
        return None


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
    bans lifted here after it began are not brought back.
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

    def learn(self, group: str, seconds_left: float, bans: int) -> None:
        now = self._clock()
        self._known[group] = _Known(now + seconds_left, bans, now)
        self._lifted.pop(group, None)

    def lift(self, group: str) -> None:
        self._known.pop(group, None)
        self._lifted[group] = self._clock()

    def replace(self, active: Iterable[KnownBan], sync_started: float) -> None:
        """Take the store's list of active bans, read by a sync that began at `sync_started`."""
        now = self._clock()
        known = {
            group: entry
            for group, entry in self._known.items()
            if entry.learned >= sync_started and entry.until > now
        }
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
