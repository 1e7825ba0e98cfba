"""The store seam: what admission needs from shared state, whatever holds it.

Two implementations keep the same semantics: `MemoryStore` (one process, `memory://`) and
`RedisStore` (any number of replicas, one atomic Lua script per decision).

Semantics every store keeps (the contract suite in tests/store checks them on each):

- `admit` checks every bucket and either admits into all of them or into none. A refused
  request writes nothing: no rate budget, no slot.
- A rate bucket admits when fewer than `limit` admissions lie in the window ending now,
  i.e. with times in (now - window, now]. A counter bucket (`exact=False`) admits when its
  estimate of that number plus one is at most `limit` (gateway/store/window_counter.py).
- A slot bucket admits when fewer than `limit` unexpired leases are held. A lease expires
  `lease` seconds after it was taken or last renewed; expired leases are purged (and
  counted as reclaimed) by the next call that touches the bucket.
- `release` frees a lease; it is idempotent, never raises, and may be batched off the
  critical path (the caller does not wait for it).
- Waiting for a slot (`admit(..., queue=QueueSpot)`): every slot bucket has a queue of
  waiters in arrival order. A newcomer admits only when `count + waiters < limit` (it never
  overtakes a waiter); refused for concurrency alone it joins the back of every queue. A
  waiter admits when `count + waiters ahead of it < limit`, and then leaves the queues; a
  rate refusal makes it leave too. Each (re)check refreshes the waiter's entry, which
  vanishes `ttl_ms` after its last refresh (a dead replica's waiters do not block for long).
  `leave_queue` removes a waiter (idempotent, synchronous like `release`). Releases with
  `wake=True`, departures from a queue and job ends set the events registered with `watch`
  for those buckets, on every replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class RateBucket:
    """One sliding window to check: `key` names its state in the store. `exact=False` counts
    it with a sliding-window counter (O(1) state, approximate) instead of a log of admissions;
    the two kinds must never share a key (their state has different types)."""

    key: str
    limit: int
    window_ms: int
    exact: bool = True
    # True: the window holds units (each admission adds `Charge.cost`), else requests (adds 1).
    counts_cost: bool = False
    # True: evaluated and written exactly as if enforced, but never refuses; a would-be refusal
    # is reported in `AdmitResult.shadow_refused` (and then writes nothing into this bucket).
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class SlotBucket:
    """One set of concurrency slots to check. A request takes `Charge.slots` of them."""

    key: str
    limit: int
    shadow: bool = False  # as RateBucket.shadow


Period = Literal["1d", "7d", "month"]


@dataclass(frozen=True, slots=True)
class QuotaBucket:
    """A period quota: at most `limit` (+ units granted for the period) in each fixed UTC
    period: `1d` (UTC days), `7d` (ISO weeks, Monday 00:00 UTC), `month` (calendar months,
    UTC). One O(1) counter; the period is computed from the store's clock."""

    key: str
    limit: int
    period: Period
    counts_cost: bool = True
    shadow: bool = False  # as RateBucket.shadow


# Upper bounds of one request's charge (config and an upstream's declared cost are held to them).
MAX_COST = 1000
MAX_SLOTS = 64


@dataclass(frozen=True, slots=True)
class Charge:
    """What one request weighs: `cost` units in every bucket that counts cost (0..MAX_COST),
    `slots` slots in every slot bucket (1..MAX_SLOTS)."""

    cost: int = 1
    slots: int = 1


ONE = Charge()


@dataclass(frozen=True, slots=True)
class Settlement:
    """Re-price an admitted request: its cost-counting buckets go from `charged` units to
    `settled` (a refund when lower, an extra debit when higher; a window or quota may go over
    its limit, later requests wait for it). `admitted_at_ms` is `AdmitResult.now_ms`: only the
    window entries and the quota period of that admission are adjusted. Idempotent per lease."""

    rates: tuple[RateBucket, ...]  # the admission's rate buckets that count cost
    quotas: tuple[QuotaBucket, ...]  # its quotas that count cost
    charged: int
    settled: int
    admitted_at_ms: float


@dataclass(slots=True)
class QuotaUsage:
    used: int  # units counted in the current period
    granted: int  # extra units granted for the current period (admin)
    reset_ms: int  # ms until the period ends


@dataclass(slots=True)
class AdmitResult:
    """What one admission decision saw, enough to build every limit header.

    Lists are parallel to the `rates` / `slots` arguments of `admit`.
    """

    admitted: bool
    # "quota" when a quota refused, else "rate" when any rate bucket refused (it can say when
    # to retry), else "concurrency".
    reason: str | None
    # Milliseconds until the request would be admitted by every refusing rate bucket and
    # quota (a quota: until its period ends; 0 when admitted or refused only for concurrency).
    retry_after_ms: int
    # Admissions in each rate window before this request (after purging expired ones); for a
    # counter bucket its estimate, rounded up.
    rate_counts: list[int]
    # Per rate bucket: ms until its oldest admission leaves the window, counting this
    # request if admitted (the window length when the bucket is empty); for a counter bucket,
    # ms until its rounded-up estimate (counting this request if admitted) drops by one.
    rate_reset_ms: list[int]
    # Unexpired leases held in each slot bucket before this request.
    slot_counts: list[int]
    # Expired leases purged by this call.
    reclaimed: int = 0
    # With a QueueSpot: refused for concurrency and now waiting in the buckets' queues.
    queued: bool = False
    # The waiter's place in the queues (pass it back in QueueSpot.arrival to keep it).
    arrival: str = ""
    # Per quota bucket (parallel to `quotas`): units used in its period before this request,
    # and ms until the period ends.
    quota_counts: list[int] = field(default_factory=list)
    quota_reset_ms: list[int] = field(default_factory=list)
    # Store keys of shadow buckets that would have refused this request.
    shadow_refused: list[str] = field(default_factory=list)
    # The store's clock at the decision, in ms (dates a later Settlement).
    now_ms: float = 0.0
    # A refusal repeated from the refusal cache (gateway/admission/controller.py), not a store
    # answer: only the refusing limits' numbers are still known (headers say nothing else).
    from_cache: bool = False


@dataclass(frozen=True, slots=True)
class QueueSpot:
    """A request that may wait for a slot: `waiter_id` is its lease id. `arrival` is empty
    for a newcomer (queued at the back when refused) and the place it was given once queued."""

    waiter_id: str
    ttl_ms: int
    arrival: str = ""


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, refused the command)."""


class AdmissionStore(Protocol):
    async def start(self) -> None:
        """Connect, load scripts, start background loops (heartbeat, release flusher)."""

    async def aclose(self) -> None:
        """Flush pending releases, stop background loops, close connections."""

    async def admit(
        self,
        rates: Sequence[RateBucket],
        slots: Sequence[SlotBucket],
        lease_id: str,
        *,
        quotas: Sequence[QuotaBucket] = (),
        charge: Charge = ONE,
    ) -> AdmitResult:
        """Decide atomically; when admitted, `lease_id` holds `charge.slots` slots in every
        slot bucket (renewed by the store's heartbeat until released), `charge.cost` units (or
        one entry) in every rate window and quota. Raises StoreError when the store cannot decide."""

    def release(
        self, slots: Sequence[SlotBucket], lease_id: str, *, settlement: Settlement | None = None
    ) -> None:
        """Free `lease_id` in `slots` (which may be empty) and apply `settlement`, in one store
        call batched off the critical path. Synchronous and idempotent: safe in any `finally`,
        even while the caller is being cancelled."""

    async def check_ready(self) -> None:
        """Run the real admission path against a probe bucket; raise StoreError if it fails."""


class WaitingStore(AdmissionStore, Protocol):
    """What waiting for a slot needs besides admission (both stores implement it)."""

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
        """As AdmissionStore.admit; with `queue`, the waiting rules in this module's docstring."""

    def release(
        self, slots: Sequence[SlotBucket], lease_id: str, wake: bool = False,
        *, settlement: Settlement | None = None,
    ) -> None:
        """As AdmissionStore.release; `wake` also tells every replica's waiters of these buckets."""

    def leave_queue(self, slots: Sequence[SlotBucket], waiter_id: str) -> None:
        """Remove a waiter from the buckets' queues and wake the others. Synchronous, idempotent."""

    def watch(self, slots: Sequence[SlotBucket], event: asyncio.Event) -> Callable[[], None]:
        """Set `event` whenever a slot of these buckets may have freed (on any replica), and
        once when the watch is in place. Returns the function that ends the watch."""


class StoreObserver(Protocol):
    """What a store reports for metrics; every method is cheap and synchronous."""

    def slots_reclaimed(self, count: int) -> None:
        """Expired leases (dead holders) were purged."""

    def leases_lost(self, count: int) -> None:
        """A heartbeat found leases this process still holds already gone (expired and reclaimed)."""

    def store_error(self, operation: str) -> None:
        """A store call failed; `operation` is one of admit, release, renew, ready."""


class NullObserver:
    def slots_reclaimed(self, count: int) -> None:
        pass

    def leases_lost(self, count: int) -> None:
        pass

    def store_error(self, operation: str) -> None:
        pass


def weighted_lease(lease_id: str, slots: int) -> str:
    """The lease id of a request holding `slots` slots in each slot bucket. The count rides in
    the id (`<id>*K`), so every later call on the lease (release, renew, undo, job handover)
    knows its members without being told."""
    return lease_id if slots <= 1 else f"{lease_id}*{slots}"


def lease_members(lease_id: str) -> list[str]:
    """The members a lease holds in a slot bucket: `id`, then `id#2` ... `id#K`."""
    _, star, count = lease_id.rpartition("*")
    slots = int(count) if star and count.isascii() and count.isdigit() else 1
    return [lease_id] + [f"{lease_id}#{n}" for n in range(2, min(slots, MAX_SLOTS) + 1)]
