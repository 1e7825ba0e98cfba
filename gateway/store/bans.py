"""The ban store seam: strikes and bans per client IP group, shared by every replica.

Two implementations keep the same semantics: `MemoryBanStore` (one process, `memory://`)
and `RedisBanStore` (gateway/store/redis_bans.py: Lua scripts on the admission store's
Redis connection). Semantics (tests/store/test_bans.py checks them on each):

- `strike` records strikes against a group, counted by kind (`StrikeCounts`: 401s, early
  rate 429s, early concurrency 429s), and decides atomically: a strike counts while its time
  lies in (now - within, now]; a group already banned records nothing; on reaching `strikes`
  the group is banned for `ban_ms(policy, n)` where n counts the bans still remembered
  (`remember` past the end of the last one), its strikes are cleared, and the ban keeps the
  counts by kind that earned it (why it was banned, for the admin API).
- `active` lists the bans in force with the ms left (ceiling), their ban number and kinds.
- `lift` ends a ban and forgets the group's strikes and past bans; True when it was banned.

Both are safe under a replay of the same call (a retry layer re-sending it): a strike call
adds nothing twice and a replayed call that banned answers "banned now" again; a replayed
lift answers what the first one did.

All times are milliseconds on the store's clock; callers only ever see durations (ms left),
so replicas never compare their clocks with the store's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config.model import Bans
from gateway.store.ban_lengths import StrikeCounts, ban_ms, ms

NOT_BANNED, ALREADY_BANNED, BANNED_NOW = 0, 1, 2


@dataclass(frozen=True, slots=True)
class StrikeVerdict:
    """What one strike call decided for one group."""

    group: str
    status: int  # NOT_BANNED, ALREADY_BANNED or BANNED_NOW
    ms_left: int  # until the ban ends (0 when not banned)
    bans: int  # bans remembered, this one included
    strikes: int  # strikes in the window (0 when already banned)
    kinds: StrikeCounts = (0, 0, 0)  # banned: the strikes by kind that earned the ban

    @property
    def banned(self) -> bool:
        return self.status != NOT_BANNED


@dataclass(frozen=True, slots=True)
class ActiveBan:
    group: str
    ms_left: int
    bans: int
    kinds: StrikeCounts = (0, 0, 0)  # the strikes by kind that earned it


class BanStore(Protocol):
    async def strike(
        self, policy: Bans, batch: Sequence[tuple[str, StrikeCounts]]
    ) -> list[StrikeVerdict | None]:
        """Record (group, strikes by kind); one verdict per item, None for an item the store
        failed to decide. Raises StoreError when the batch failed as a whole."""

    async def active(self) -> list[ActiveBan]:
        """The bans in force now. Raises StoreError."""

    async def lift(self, group: str) -> bool:
        """End the ban on `group` (and forget its past); True when it was banned. Raises StoreError."""


@dataclass(slots=True)
class _Group:
    strikes: deque[tuple[float, int]] = field(default_factory=deque)  # (time, kind)
    strikes_expire: float = 0.0  # like the strikes key's TTL: nothing left to count after it
    until: float = 0.0
    bans: int = 0
    forget: float = 0.0
    kinds: StrikeCounts = (0, 0, 0)


class MemoryBanStore:
    """strike.lua, ban_index.lua and unban.lua for one process. Never awaits in a decision."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._groups: dict[str, _Group] = {}
        self._calls = 0

    def _now(self) -> float:
        return round(self._clock() * 1000.0, 3)

    async def strike(
        self, policy: Bans, batch: Sequence[tuple[str, StrikeCounts]]
    ) -> list[StrikeVerdict | None]:
        now = self._now()
        return [self._strike(policy, group, counts, now) for group, counts in batch]

    def _strike(self, policy: Bans, group: str, counts: StrikeCounts, now: float) -> StrikeVerdict:
        state = self._groups.get(group)
        if state is None:
            state = self._groups[group] = _Group()
        if state.until > now:
            return StrikeVerdict(group, ALREADY_BANNED, math.ceil(state.until - now), state.bans, 0, state.kinds)
        bans = state.bans if state.forget > now else 0
        within = ms(policy.within)
        strikes = state.strikes
        horizon = now - within
        while strikes and strikes[0][0] <= horizon:
            strikes.popleft()
        room = policy.strikes  # more than enough to decide, as in strike.lua
        for kind, weight in enumerate(counts):
            take = min(weight, room)
            strikes.extend([(now, kind)] * take)
            room -= take
        count = len(strikes)
        if count < policy.strikes:
            state.strikes_expire = now + math.ceil(within)
            state.bans = bans
            return StrikeVerdict(group, NOT_BANNED, 0, bans, count)
        bans += 1
        length = ban_ms(policy, bans)
        state.until = now + length
        state.forget = round(state.until + ms(policy.remember), 3)
        state.bans = bans
        by_kind = [0, 0, 0]
        for _, kind in strikes:
            by_kind[kind] += 1
        state.kinds = (by_kind[0], by_kind[1], by_kind[2])
        strikes.clear()
        return StrikeVerdict(group, BANNED_NOW, length, bans, count, state.kinds)

    async def active(self) -> list[ActiveBan]:
        now = self._now()
        self._sweep(now)
        return [
            ActiveBan(group, math.ceil(state.until - now), state.bans, state.kinds)
            for group, state in self._groups.items()
            if state.until > now
        ]

    async def lift(self, group: str) -> bool:
        state = self._groups.pop(group, None)
        return state is not None and state.until > self._now()

    def _sweep(self, now: float) -> None:
        """Drop groups with nothing left to remember (memory stays bounded by live state)."""
        for group in [
            group
            for group, state in self._groups.items()
            if state.forget <= now and state.until <= now and state.strikes_expire <= now
        ]:
            del self._groups[group]
