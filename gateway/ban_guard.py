"""IP bans at run time: the ban check of the hot path, strikes, and what this replica knows.

Cost model (PERFORMANCE.md §7): the ban check reads only the local `BanCache`, so neither a
well-behaved request nor a banned one pays a store round trip for bans. Strikes happen only
on 401 and 429 answers; they are queued and sent off the critical path, every strike queued
during one event-loop tick in one batch (one strike.lua call per IP group). When a batch
imposes a ban, this replica caches it at once; other replicas learn it from the store's index
at their next sync (every `sync_interval`, one call), or from their own next strike of that
group, whichever comes first. Lifting a ban clears this replica's cache entry at once and the
others' at their next sync.

A failing ban store never fails a request: its calls are counted as
`gateway_store_errors_total{operation="bans"}` (by the store), strikes of a failed batch are
dropped, and the cached bans stay in force until they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.admission.bans import (
    BanCache,
    IPAddress,
    KnownBan,
    group_of,
    is_exempt,
    parse_group,
    retry_after,
)
from gateway.config.model import Bans
from gateway.metrics import Metrics
from gateway.store.bans import BANNED_NOW, ActiveBan, BanStore
from gateway.store.base import StoreError

log = logging.getLogger(__name__)

SYNC_INTERVAL = 1.0  # seconds: the longest another replica's new ban or lift stays unknown here
MAX_PENDING_GROUPS = 10_000  # strikes queued for more groups than this (store down) are dropped
DEFAULT_IPV6_PREFIX = Bans().ipv6_prefix


@dataclass(frozen=True, slots=True)
class BanEntry:
    """One active ban as the admin API shows it."""

    group: str
    seconds_left: float
    until: float  # unix time
    bans: int


class BanGuard:
    def __init__(
        self,
        store: BanStore,
        metrics: Metrics,
        policy: Callable[[], Bans | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        sync_interval: float = SYNC_INTERVAL,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._policy = policy
        self._cache = BanCache(clock)
        self._sync_interval = sync_interval
        self._pending: dict[str, int] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None

    # -- hot path (never awaits) ------------------------------------------------------------

    def retry_after(self, ip: IPAddress | None, policy: Bans | None) -> int | None:
        """Seconds until `ip`'s ban ends (the 403's Retry-After), or None when it may pass."""
        if not self._cache or ip is None or policy is None:
            return None
        left = self._cache.seconds_left(group_of(ip, policy.ipv6_prefix))
        if left is None or is_exempt(ip, policy.allow):
            return None
        return retry_after(left)

    def strike(self, ip: IPAddress | None, policy: Bans | None) -> None:
        """Count one 401 or 429 against `ip` (unless exempt); sent with this tick's batch."""
        if ip is None or policy is None or is_exempt(ip, policy.allow):
            return
        group = group_of(ip, policy.ipv6_prefix)
        pending = self._pending
        if group in pending:
            pending[group] += 1
        elif len(pending) < MAX_PENDING_GROUPS:
            pending[group] = 1
        if self._flusher is None or self._flusher.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._flusher = loop.create_task(self._flush(), name="ban-strikes")

    # -- background ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._syncer is None:
            self._syncer = asyncio.create_task(self._sync_loop(), name="ban-sync")

    async def aclose(self) -> None:
        syncer, self._syncer = self._syncer, None
        if syncer is not None:
            syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await syncer
        with contextlib.suppress(Exception):
            await self.flush()

    async def flush(self) -> None:
        """Wait until every strike queued so far has been decided (or has failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        # First run on the next loop iteration: every strike of this one has joined the batch.
        while self._pending:
            batch, self._pending = list(self._pending.items()), {}
            policy = self._policy()
            if policy is None:  # bans switched off by a reload: nothing to decide
                return
            try:
                verdicts = await self._store.strike(policy, batch)
            except StoreError as exc:
                log.warning("ban strikes for %d group(s) dropped: %s", len(batch), exc)
                continue
            except Exception:  # a bug must not stop the next batches
                log.exception("ban strike batch crashed")
                continue
            for verdict in verdicts:
                if verdict is None or not verdict.banned:
                    continue
                self._cache.learn(verdict.group, verdict.ms_left / 1000, verdict.bans)
                if verdict.status == BANNED_NOW:
                    self._metrics.bans.inc()
                    log.info("banned %s for %.3fs (ban #%d)",
                             verdict.group, verdict.ms_left / 1000, verdict.bans)
            self._metrics.banned_ips.set(len(self._cache))

    async def sync(self) -> None:
        """Replace the cache with the store's active bans (one call). Raises StoreError."""
        started = self._cache.now()
        active = await self._store.active()
        self._cache.replace((KnownBan(b.group, b.ms_left / 1000, b.bans) for b in active), started)
        self._metrics.banned_ips.set(len(self._cache))

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval)
            if self._policy() is None and not self._cache:
                continue  # bans are off: nothing to learn, no store call
            try:
                await self.sync()
            except StoreError as exc:
                log.warning("ban sync failed, keeping %d cached ban(s): %s", len(self._cache), exc)
            except Exception:
                log.exception("ban sync crashed")

    # -- admin -----------------------------------------------------------------------------------

    async def list_active(self) -> list[BanEntry]:
        """The bans in force, from the store. Raises StoreError."""
        active: list[ActiveBan] = await self._store.active()
        now = time.time()
        return [
            BanEntry(b.group, b.ms_left / 1000, round(now + b.ms_left / 1000, 3), b.bans)
            for b in sorted(active, key=lambda b: b.group)
        ]

    def group_for(self, text: str) -> str | None:
        """The group an admin's `{ip}` names (an address or an IPv6 prefix), or None."""
        policy = self._policy()
        return parse_group(text, policy.ipv6_prefix if policy else DEFAULT_IPV6_PREFIX)

    async def lift(self, group: str) -> bool:
        """End the ban on `group` everywhere; True when it was banned. Raises StoreError."""
        lifted = await self._store.lift(group)
        cached = self._cache.seconds_left(group) is not None
        self._cache.lift(group)
        self._metrics.banned_ips.set(len(self._cache))
        return lifted or cached

