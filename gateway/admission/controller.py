"""The admission decision: the only admission module that awaits.

Theory of operation: the app resolves key and route to an `AdmissionPlan` (pure, cached),
then calls `Admission.admit`, which makes exactly one store call. When the store cannot
answer (error, timeout, or the breaker is open after repeated failures), `store.on_error`
decides, and every such decision is counted (and the first failure of a streak logged):

- `local`: this replica enforces the same buckets in-process until the store answers again
  (limits become per replica, each divided by `store.local_divisor`; slots taken locally are
  released locally; at each switch, the slots still held in one store are mirrored into the
  other: gateway/admission/transitions.py);
- `allow`: admit without limits (no limit headers: nothing is known);
- `deny`: refuse with 503 `store_unavailable`.

The returned `Ticket` remembers which store holds the lease, so the release always goes
where the slot was taken.

Rate refusals of the shared store are remembered (`RefusalCache`): a refusal by a rate bucket
with `retry_after_ms = t` stays true until t has passed, on every replica, since admissions only
leave a window with time. Until then the same plan is refused here with no store call, its
Retry-After counting down; such a refusal carries no slot counts (they may have changed since),
so its headers leave the concurrency numbers out. Concurrency refusals are never cached (a slot can free any moment);
nor are decisions of the local fallback store or of `on_error: allow`.

A plan with a `wait` admits through the waiter queues (one store call all the same): refused
for concurrency alone, the ticket comes back `waiting_in` the store's queues, and
gateway/admission/waiting.py re-checks it with `recheck` until it is admitted, refused by a
rate limit, or gives up (`leave_queue`). Releases of such a plan wake the waiters.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar, cast

from gateway.admission.breaker import CircuitBreaker
from gateway.admission.buckets import AdmissionPlan
from gateway.admission.transitions import OutageBridge
from gateway.config.model import OnError
from gateway.metrics import Metrics
from gateway.store.base import (
    AdmissionStore,
    AdmitResult,
    QueueSpot,
    RateBucket,
    SlotBucket,
    StoreError,
    WaitingStore,
)

log = logging.getLogger("gateway.admission")


class StoreUnavailable(Exception):
    """The store cannot decide and `on_error: deny` refuses the request."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("store unavailable")
        self.retry_after = retry_after


@dataclass(slots=True)
class Ticket:
    """One admission attempt: its lease, its result, and the store that must release it."""

    lease_id: str
    result: AdmitResult | None  # None when admitted blind (`on_error: allow`)
    store: AdmissionStore | None  # who holds the slots; None when nothing was taken
    waiting_in: AdmissionStore | None = None  # whose waiter queues hold it (plans with `wait`)

    @property
    def admitted(self) -> bool:
        return self.result is None or self.result.admitted


# Lease ids: a random per-process prefix and a counter. Unique across replicas and cheap.
_LEASE_PREFIX = os.urandom(6).hex()
_lease_counter = itertools.count()


def new_lease_id() -> str:
    return f"{_LEASE_PREFIX}{next(_lease_counter):x}"


@dataclass(slots=True)
class _Refusal:
    plan: AdmissionPlan  # held, so that no other plan can get its id while the entry lives
    asked_at: float  # the clock just before the store call that refused
    deadline: float  # asked_at + retry_after: the refusal is exact at least until then
    result: AdmitResult

    def at(self, now: float) -> AdmitResult:
        """The refusal as it stands at `now`: Retry-After and the rate resets count down. No
        slot counts: slots may have been taken or freed since, so the headers omit them; nor
        do they repeat the other rate limits' numbers (other routes may have spent them)."""
        elapsed_ms = int((now - self.asked_at) * 1000)  # rounded down: never earlier than the store's numbers
        result = self.result
        return AdmitResult(
            False, "rate", max(1, result.retry_after_ms - elapsed_ms), result.rate_counts,
            [max(0, reset_ms - elapsed_ms) for reset_ms in result.rate_reset_ms], [], from_cache=True,
        )


class RefusalCache:
    """Rate refusals of the shared store, per plan, until the moment they could end.

    Keyed by the plan object: plans are immutable and rebuilt on a config reload, so a reload
    (which may raise a limit) starts afresh. The deadline is counted from the clock read before
    the store call, so it is never later than the store's own. At most `max_entries` entries
    (keys x routes over their limits): past that, expired ones go first, then the oldest.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 4096) -> None:
        self.clock = clock
        self._max_entries = max_entries
        self._entries: dict[int, _Refusal] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, plan: AdmissionPlan) -> AdmitResult | None:
        """The cached refusal of `plan`, counted down to now, or None."""
        entry = self._entries.get(id(plan))
        if entry is None:
            return None
        now = self.clock()
        if now >= entry.deadline:
            del self._entries[id(plan)]
            return None
        return entry.at(now)

    def remember(self, plan: AdmissionPlan, asked_at: float, result: AdmitResult) -> None:
        """Keep `result` if it is a rate refusal (the store was asked at `asked_at`)."""
        if result.admitted or result.reason != "rate" or result.retry_after_ms <= 0:
            return
        entries = self._entries
        entries.pop(id(plan), None)  # re-inserted last: the oldest entries are the first to go
        if len(entries) >= self._max_entries:
            self._make_room()
        entries[id(plan)] = _Refusal(plan, asked_at, asked_at + result.retry_after_ms / 1000, result)

    def _make_room(self) -> None:
        """Drop expired entries; if too many are still live, the oldest quarter (so this full
        scan runs at most once per `max_entries / 4` new entries)."""
        now = self.clock()
        live = {plan_id: entry for plan_id, entry in self._entries.items() if entry.deadline > now}
        if len(live) >= self._max_entries:
            live = dict(list(live.items())[len(live) // 4:])
        self._entries = live


def recheck_interval(wait: float) -> float:
    """How often a waiter re-checks without a wake-up (lost message, expired lease)."""
    return min(0.5, max(0.05, wait / 4))


def waiter_ttl_ms(wait: float) -> int:
    """A waiter's queue entry outlives its last check by this much: a dead replica's waiters
    stop counting soon, a live one refreshes its entry at every check."""
    return round(max(1.0, 4 * recheck_interval(wait)) * 1000)


class Admission:
    def __init__(
        self,
        store: AdmissionStore,
        *,
        on_error: OnError,
        metrics: Metrics,
        local: AdmissionStore | None = None,
        breaker: CircuitBreaker | None = None,
        local_divisor: int = 1,
        refusals: RefusalCache | None = None,
    ) -> None:
        self.store = store
        self._on_error = on_error
        self._metrics = metrics
        self._local = local
        self._local_divisor = max(1, local_divisor)
        self.breaker = breaker or CircuitBreaker()
        self.refusals = refusals if refusals is not None else RefusalCache()
        # Under `on_error: local`, each store learns of the other's slots still in flight at a
        # switch (gateway/admission/transitions.py).
        self.bridge = OutageBridge(store, local) if on_error == "local" and local is not None else None
        self._failing = False  # the last admission call to the store failed (logged once per streak)

    @property
    def on_error(self) -> OnError:
        return self._on_error

    @property
    def degraded(self) -> bool:
        return self.breaker.is_open

    async def admit(self, plan: AdmissionPlan) -> Ticket:
        lease_id = new_lease_id()
        if plan.empty:
            return Ticket(lease_id, None, None)
        cached = self.refusals.get(plan)
        if cached is not None:
            self._metrics.cached_refusals.inc()
            return Ticket(lease_id, cached, None)
        if self.breaker.allow():
            asked_at = self.refusals.clock()
            try:
                if plan.wait:
                    return await self._admit_waiting(self.store, plan, lease_id)
                result = await self.store.admit(plan.rates, plan.slots, lease_id)
            except StoreError as exc:
                self.breaker.failure()
                self._store_failed(exc)
            except BaseException:  # cancelled (client gone): says nothing about the store
                self.breaker.abandon()
                raise
            else:
                self.breaker.success()
                if self._failing:
                    self._store_answers()
                if self.bridge is not None:
                    self.bridge.to_shared()
                if not result.admitted:
                    self.refusals.remember(plan, asked_at, result)
                    return Ticket(lease_id, result, None)
                if plan.slots and self.bridge is not None:
                    self.bridge.admitted(self.store, plan, lease_id)
                return Ticket(lease_id, result, self.store if plan.slots else None)
        return await self._fallback(plan, lease_id)

    async def _admit_waiting(
        self, store: AdmissionStore, plan: AdmissionPlan, lease_id: str, arrival: str = ""
    ) -> Ticket:
        rates, slots = self._buckets(store, plan)
        spot = QueueSpot(lease_id, waiter_ttl_ms(plan.wait), arrival)
        asked_at = self.refusals.clock()
        result = await cast(WaitingStore, store).admit(rates, slots, lease_id, spot)
        if store is self.store:  # only the shared store's refusals hold everywhere
            self.breaker.success()
            if self._failing:
                self._store_answers()
            if self.bridge is not None:
                self.bridge.to_shared()
            self.refusals.remember(plan, asked_at, result)
        if result.admitted and plan.slots and self.bridge is not None:
            self.bridge.admitted(store, plan, lease_id)
        return Ticket(lease_id, result, store if result.admitted and plan.slots else None,
                      store if result.queued else None)

    def _buckets(
        self, store: AdmissionStore, plan: AdmissionPlan
    ) -> tuple[Sequence[RateBucket], Sequence[SlotBucket]]:
        divisor = self._local_divisor
        if store is self.store or divisor == 1:
            return plan.rates, plan.slots
        return _divided(plan.rates, divisor), _divided(plan.slots, divisor)

    async def recheck(self, plan: AdmissionPlan, ticket: Ticket) -> Ticket:
        """Try a waiting ticket again, keeping its place; the new ticket may wait on."""
        store = ticket.waiting_in
        if store is None or ticket.result is None:
            return ticket
        try:
            return await self._admit_waiting(store, plan, ticket.lease_id, ticket.result.arrival)
        except StoreError as exc:
            if store is self.store:
                self.breaker.failure()
                self._store_failed(exc)
            self.leave_queue(plan, ticket)
            return await self._fallback(plan, ticket.lease_id)

    def leave_queue(self, plan: AdmissionPlan, ticket: Ticket) -> None:
        """Stop waiting (synchronous, idempotent)."""
        if ticket.waiting_in is not None:
            store, ticket.waiting_in = ticket.waiting_in, None
            cast(WaitingStore, store).leave_queue(plan.slots, ticket.lease_id)

    async def _fallback(self, plan: AdmissionPlan, lease_id: str) -> Ticket:
        self._metrics.fallback_decisions.labels(self._on_error).inc()
        if self._on_error == "deny":
            raise StoreUnavailable(retry_after=max(1, round(self.breaker.seconds_until_probe() + 0.5)))
        if self._on_error == "local" and self._local is not None:
            if self.bridge is not None:
                await self.bridge.to_local()
            if plan.wait:
                return await self._admit_waiting(self._local, plan, lease_id)
            divisor = self._local_divisor
            rates, slots = (plan.rates, plan.slots) if divisor == 1 else (
                _divided(plan.rates, divisor), _divided(plan.slots, divisor))
            result = await self._local.admit(rates, slots, lease_id)
            if result.admitted and plan.slots and self.bridge is not None:
                self.bridge.admitted(self._local, plan, lease_id)
            # Released under the plan's bucket keys: a divided bucket keeps its key.
            return Ticket(lease_id, result, self._local if result.admitted and plan.slots else None)
        return Ticket(lease_id, None, None)

    def release(self, plan: AdmissionPlan, ticket: Ticket) -> None:
        """Free the ticket's slots (synchronous, idempotent: safe in any `finally`)."""
        if ticket.store is not None:
            store, ticket.store = ticket.store, None
            if self.bridge is not None:
                self.bridge.released(store, plan, ticket.lease_id)
            if plan.wait:  # someone may be waiting for this slot
                cast(WaitingStore, store).release(plan.slots, ticket.lease_id, wake=True)
            else:
                store.release(plan.slots, ticket.lease_id)

    def _store_failed(self, exc: StoreError) -> None:
        """One log line per failing streak (every failure is counted in the metrics)."""
        if not self._failing:
            self._failing = True
            log.warning("store admission failed, deciding by on_error: %s until it answers again: %s",
                        self._on_error, exc)

    def _store_answers(self) -> None:
        self._failing = False
        log.info("store answers admissions again")


_Bucket = TypeVar("_Bucket", RateBucket, SlotBucket)


def _divided(buckets: Sequence[_Bucket], divisor: int) -> tuple[_Bucket, ...]:
    """Each bucket's share of its limit on this replica (never below 1: a key stays usable)."""
    return tuple(replace(bucket, limit=max(1, bucket.limit // divisor)) for bucket in buckets)
