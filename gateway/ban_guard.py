"""IP bans at run time: the ban check of the hot path, strikes, and what this replica knows.

What is a strike: every 401, and a 429 that came back before the wait it was told
(`ReturnLedger` in gateway/admission/bans.py decides that in process, no store call).

Cost model (PERFORMANCE.md §7): the ban check reads only the local `BanCache`, so neither a
well-behaved request nor a banned one pays a store round trip for bans. Strikes are queued
and sent off the critical path, every strike queued during one event-loop tick in one batch
(one strike.lua call per IP group). When a batch imposes a ban, this replica caches it at
once; other replicas learn it from the store's index at their next sync (every
`sync_interval`, one call), or from their own next strike of that group, whichever comes first.
Lifting a ban clears this replica's cache entry at once and the others' at their next sync.

Exact at the limit: while a client has strikes this replica has not seen decided (queued, or
in a batch in flight), its ban check answers `DECIDING` and the request waits for that verdict
(one store round trip, at most `VERDICT_WAIT`) instead of being answered before the store
decided. So every strike takes effect before this replica's next answer to that client: a
flood of 401s over any number of connections gets exactly `strikes` 401s from one replica, and
at most `strikes + replicas - 1` from several (each replica has at most one undecided strike
of that client when the limit is reached). Only a client with fresh strikes ever waits.

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
    UNAUTHORIZED,
    BanCache,
    IPAddress,
    KnownBan,
    ReturnLedger,
    StrikeCounts,
    group_of,
    is_exempt,
    parse_group,
    retry_after,
    total,
)
from gateway.config.model import Bans
from gateway.metrics import Metrics
from gateway.store.bans import BANNED_NOW, ActiveBan, BanStore, StrikeVerdict
from gateway.store.base import StoreError

log = logging.getLogger(__name__)

SYNC_INTERVAL = 1.0  # seconds: the longest another replica's new ban or lift stays unknown here
MAX_PENDING_GROUPS = 10_000  # strikes queued for more groups than this (store down) are dropped
MAX_RETURN_SCOPES = 10_000  # (IP group, key, route, kind) told waits remembered (ReturnLedger)
VERDICT_WAIT = 1.0  # seconds: the longest a request at the limit waits for its group's verdict
DEFAULT_IPV6_PREFIX = Bans().ipv6_prefix
DECIDING = 0  # retry_after(): this client's strikes reached the limit; await verdict()


@dataclass(frozen=True, slots=True)
class BanEntry:
    """One active ban as the admin API shows it."""

    group: str
    seconds_left: float
    until: float  # unix time
    bans: int
    kinds: StrikeCounts  # the strikes by kind that earned it


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
        self._returns = ReturnLedger(clock, MAX_RETURN_SCOPES)
        self._sync_interval = sync_interval
        self._pending: dict[str, list[int]] = {}  # group -> strikes by kind, not sent yet
        self._sent: dict[str, int] = {}  # group -> strikes in batches not decided yet
        self._batch_done: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None

    # -- hot path (never awaits) ------------------------------------------------------------

    def retry_after(self, ip: IPAddress | None, policy: Bans | None) -> int | None:
        """Seconds until `ip`'s ban ends (the 403's Retry-After), None when it may pass, or
        DECIDING when it has strikes the store has not decided yet."""
        if (not self._cache and not self._pending and not self._sent) or ip is None or policy is None:
            return None
        group = group_of(ip, policy.ipv6_prefix)
        left = self._cache.seconds_left(group)
        if left is None:
            if (group in self._pending or group in self._sent) and not is_exempt(ip, policy.allow):
                return DECIDING
            return None
        if is_exempt(ip, policy.allow):
            return None
        return retry_after(left)

    async def verdict(self, ip: IPAddress | None, policy: Bans | None) -> int | None:
        """After DECIDING: wait (at most VERDICT_WAIT) until the store decided this client's
        strikes; then its Retry-After, or None."""
        if ip is None or policy is None:
            return None
        group = group_of(ip, policy.ipv6_prefix)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VERDICT_WAIT
        while (group in self._pending or group in self._sent) and self._cache.seconds_left(group) is None:
            left = deadline - loop.time()
            if left <= 0:
                break
            if self._batch_done is None:
                self._batch_done = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # not wait_for: no task per waiter
                    await self._batch_done.wait()
        left_s = self._cache.seconds_left(group)
        return None if left_s is None else retry_after(left_s)

    def strike(self, ip: IPAddress | None, policy: Bans | None, kind: int = UNAUTHORIZED) -> None:
        """Count one strike of `kind` against `ip` (unless exempt); sent with this tick's batch."""
        if ip is None or policy is None or is_exempt(ip, policy.allow):
            return
        self._strike(group_of(ip, policy.ipv6_prefix), kind)

    def refused(
        self, ip: IPAddress | None, policy: Bans | None, key_id: str, route: str, kind: int, told: float | None
    ) -> bool:
        """A 429 (`kind` RATE or CONCURRENCY) told to wait `told` seconds (None: a concurrency
        refusal, whose wait is `concurrency_grace`): a strike when it came back early. Returns
        whether it was one."""
        if ip is None or policy is None or is_exempt(ip, policy.allow):
            return False
        group = group_of(ip, policy.ipv6_prefix)
        wait = policy.concurrency_grace if told is None else told
        if not self._returns.refused(group, (key_id, route, kind), wait, policy.tolerance, policy.within):
            return False
        self._strike(group, kind)
        return True

    def _strike(self, group: str, kind: int) -> None:
        self._metrics.ban_strikes_by_kind[kind].inc()
        pending = self._pending
        counts = pending.get(group)
        if counts is None:
            if len(pending) >= MAX_PENDING_GROUPS:
                return
            counts = pending[group] = [0, 0, 0]
        counts[kind] += 1
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
            queued, self._pending = self._pending, {}
            batch: list[tuple[str, StrikeCounts]] = [
                (group, (c[0], c[1], c[2])) for group, c in queued.items()
            ]
            policy = self._policy()
            if policy is None:  # bans switched off by a reload: nothing to decide
                self._pending.clear()
                self._wake()
                return
            sent = self._sent
            for group, counts in batch:
                sent[group] = sent.get(group, 0) + total(counts)
            verdicts: list[StrikeVerdict | None]
            try:
                verdicts = await self._store.strike(policy, batch)
            except StoreError as exc:
                log.warning("ban strikes for %d group(s) dropped: %s", len(batch), exc)
                verdicts = [None] * len(batch)
            except Exception:  # a bug must not stop the next batches
                log.exception("ban strike batch crashed")
                verdicts = [None] * len(batch)
            self._decided(batch, verdicts)

    def _decided(self, batch: list[tuple[str, StrikeCounts]], verdicts: list[StrikeVerdict | None]) -> None:
        sent = self._sent
        for (group, counts), verdict in zip(batch, verdicts, strict=True):
            left = sent.get(group, 0) - total(counts)
            if left > 0:
                sent[group] = left
            else:
                sent.pop(group, None)
            if verdict is not None and verdict.banned:
                self._cache.learn(verdict.group, verdict.ms_left / 1000, verdict.bans,
                                  imposed=verdict.status == BANNED_NOW)
                if verdict.status == BANNED_NOW:
                    self._metrics.bans.inc()
                    log.info("banned %s for %.3fs (ban #%d; strikes: %d unauthorized, %d rate, %d concurrency)",
                             verdict.group, verdict.ms_left / 1000, verdict.bans, *verdict.kinds)
        self._metrics.banned_ips.set(len(self._cache))
        self._wake()

    def _wake(self) -> None:
        """Let the requests waiting for a verdict look again."""
        event, self._batch_done = self._batch_done, None
        if event is not None:
            event.set()

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
            BanEntry(b.group, b.ms_left / 1000, round(now + b.ms_left / 1000, 3), b.bans, b.kinds)
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

