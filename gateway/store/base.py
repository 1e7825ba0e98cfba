"""The store seam: what admission needs from shared state, whatever holds it.

Two implementations keep the same semantics: `MemoryStore` (one process, `memory://`) and
`RedisStore` (any number of replicas, one atomic Lua script per decision).

Semantics every store keeps (the contract suite in tests/store checks them on each):

- `admit` checks every bucket and either admits into all of them or into none. A refused
  request writes nothing: no rate budget, no quota, no slot.
- A request weighs `Charge(cost, slots)`. A bucket's units are the cost when it counts cost
  (`counts_cost`), else 1; cost 0 writes nothing into a cost-counting bucket.
- A rate bucket admits when `count + units <= limit`, count being the units whose times lie in
  the window ending now, (now - window, now]; a log holds one entry per unit (`id`, `id#2` ..),
  all at the admission time. A counter bucket (`exact=False`) admits when its estimate of that
  count plus the units is at most `limit` (gateway/store/window_counter.py). A request whose
  units exceed a limit is refused by it with retry_after = the window.
- A quota admits when `used + units <= limit + granted` in the current fixed UTC period
  (gateway/store/periods.py: `1d`, ISO `7d`, calendar `month`); refused, reason "quota"
  (precedence over "rate", then "concurrency"), retry_after_ms to the period's end.
- A slot bucket admits when `count + K <= limit`, K = `Charge.slots`, count the unexpired lease
  members held. A lease of K slots holds K members (`weighted_lease` / `lease_members`: K rides
  in the lease id, so release, renew, undo and job handover know it). A lease expires `lease`
  seconds after it was taken or last renewed; expired members are purged (and counted as
  reclaimed) by the next call that touches the bucket.
- A shadow bucket is checked like an enforced one but never refuses: when it would, nothing is
  written into it and its key is listed in `AdmitResult.shadow_refused`. It never queues.
- `release` frees a lease; it is idempotent, never raises, and may be batched off the
  critical path (the caller does not wait for it). With a `Settlement` it also re-prices the
  admission in the same store call (log: the lease's entries become `settled`, while in the
  window; counter: its count of the admission's window, or of the previous one; quota: `used`
  of the admission's period), at most once per lease id; a window or quota may end up over its
  limit, and later requests wait for it.
- `adjust_quota` grants units for the current period and/or resets it (used 0, granted 0).
- Waiting for a slot (`admit(..., queue=QueueSpot)`): every slot bucket has a queue of
  waiters in arrival order, a waiter holding K entries. A newcomer admits only when
  `count + queued + K <= limit` (it never overtakes a waiter); refused for concurrency alone it
  joins the back of every queue. A waiter admits when `count + entries ahead of it + K <= limit`,
  and then leaves the queues; a rate or quota refusal makes it leave too. Each (re)check
  refreshes the waiter's entries, which vanish `ttl_ms` after their last refresh (a dead
  replica's waiters do not block for long). `leave_queue` removes a waiter (idempotent,
  synchronous like `release`). Releases with `wake=True`, departures from a queue and job ends
  set the events registered with `watch` for those buckets, on every replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# Upper bounds of one request's charge, re-exported: defined with the config model, which the
# config loader's child process imports without the store package.
from gateway.config.model import MAX_COST as MAX_COST
from gateway.config.model import MAX_SLOTS as MAX_SLOTS


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

    # The admission's rate buckets that count cost, and its quotas that count cost, less those
    # in its `shadow_refused` (they hold nothing of it: a counter or quota cannot tell).
    rates: tuple[RateBucket, ...]
    quotas: tuple[QuotaBucket, ...]
    charged: int
    settled: int
    admitted_at_ms: float


@dataclass(slots=True)
class QuotaUsage:
    used: int  # units counted in the current period
    granted: int  # extra units granted for the current period (admin)
    reset_ms: int  # ms until the period ends


@dataclass(slots=True, init=False)
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
    # Per quota bucket: units granted for its current period (admin), on top of its limit.
    quota_granted: list[int] = field(default_factory=list)
    # Store keys of shadow buckets that would have refused this request.
    shadow_refused: list[str] = field(default_factory=list)
    # The store's clock at the decision, in ms (dates a later Settlement).
    now_ms: float = 0.0
    # A refusal repeated from the refusal cache (gateway/admission/controller.py), not a store
    # answer: only the refusing limits' numbers are still known (headers say nothing else).
    from_cache: bool = False

    # Written out rather than generated, so that a caller can pass None for an empty list (the
    # memory store's common shape: no quota, no shadow) instead of building one to be kept.
    # The same parameters as the generated one, in the fields' order (a test checks it).
    def __init__(
        self,
        admitted: bool,
        reason: str | None,
        retry_after_ms: int,
        rate_counts: list[int],
        rate_reset_ms: list[int],
        slot_counts: list[int],
        reclaimed: int = 0,
        queued: bool = False,
        arrival: str = "",
        quota_counts: list[int] | None = None,
        quota_reset_ms: list[int] | None = None,
        quota_granted: list[int] | None = None,
        shadow_refused: list[str] | None = None,
        now_ms: float = 0.0,
        from_cache: bool = False,
    ) -> None:
        self.admitted = admitted
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.rate_counts = rate_counts
        self.rate_reset_ms = rate_reset_ms
        self.slot_counts = slot_counts
        self.reclaimed = reclaimed
        self.queued = queued
        self.arrival = arrival
        # None (left out): a fresh empty list, as a default factory would give.
        self.quota_counts = [] if quota_counts is None else quota_counts
        self.quota_reset_ms = [] if quota_reset_ms is None else quota_reset_ms
        self.quota_granted = [] if quota_granted is None else quota_granted
        self.shadow_refused = [] if shadow_refused is None else shadow_refused
        self.now_ms = now_ms
        self.from_cache = from_cache


@dataclass(frozen=True, slots=True)
class QueueSpot:
    """A request that may wait for a slot: `waiter_id` is its lease id. `arrival` is empty
    for a newcomer (queued at the back when refused) and the place it was given once queued."""

    waiter_id: str
    ttl_ms: int
    arrival: str = ""


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, refused the command)."""


class StoreRejected(StoreError):
    """The store answered, but this one call failed for a reason of its own keys: what they
    hold (a key of another type under the prefix, written by another program or by hand; a
    value no script expects), or where they are (`SlotMigrating`). It says nothing about the
    store's health: other calls, other keys, go on."""


class SlotMigrating(StoreRejected):
    """Cluster: this call's hash slot is being moved between primaries, and Redis ran nothing.
    While a slot migrates, Redis refuses a script over several keys of it unless all of them
    sit on one node (TRYAGAIN), and an admission's keys rarely all exist; the slot's other
    calls meet the same until the move ends, the other slots go on."""


# Error codes that speak for the whole store whatever call drew them (memory, a read-only
# replica, persistence failing, a running script, loading, the cluster or auth).
_STORE_WIDE_CODES = frozenset({
    "OOM", "READONLY", "MISCONF", "BUSY", "LOADING", "NOSCRIPT", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
    "NOREPLICAS", "NOAUTH", "NOPERM", "WRONGPASS", "MOVED", "ASK", "UNBLOCKED", "EXECABORT",
})


# An ACL denial inside a script: Redis 7.0 answers it with a plain `ERR` (`ERR The user
# executing the script can't run this command or subcommand`, `... can't access at least one of
# the keys ...`, `... can't publish to the channel ...`; redis-py may strip the `ERR`), later
# versions with `NOPERM ... no permissions to ...`. It is the store's user that lacks the
# right, so every call of every key meets it: store-wide, as NOPERM outside a script.
_STORE_WIDE_MESSAGES = ("The user executing the script can't", "no permissions to")


def rejected_for_its_keys(error: BaseException) -> bool:
    """An error reply raised while a script ran (Redis appends `script: <sha>, on
    @user_script:N.`), for a reason of the call's own keys (`WRONGTYPE`, `ERR hash value is
    not an integer`, a Lua error on an unexpected value), not the store's (an ACL denial is
    the store's: `_STORE_WIDE_MESSAGES`)."""
    text = str(error)
    return ("@user_script:" in text and text.split(" ", 1)[0] not in _STORE_WIDE_CODES
            and not any(message in text for message in _STORE_WIDE_MESSAGES))


class AdmissionStore(Protocol):
    # How many turns of the event loop after `release` its write is sent (0: done when it
    # returns; a shared store batches it): a caller that must have it on its way first lets the
    # loop turn that often.
    release_turns: int
    # A store of several independent servers (Cluster): which one decides the calls over a hash
    # tag's keys now (None while not known), so that a caller keeps a circuit breaker per
    # server and one failing primary does not stop the others' keys. None: one server.
    failure_domain: Callable[[str], object] | None
    # The hash tag of the keys `check_ready` probes (Cluster: its success speaks for the primary
    # that owns them).
    ready_tag: str

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

    async def adjust_quota(self, quota: QuotaBucket, *, grant: int = 0, reset: bool = False) -> QuotaUsage:
        """Reset the quota's current period (used 0, granted 0) when `reset`, then add `grant`
        (0..scripts.MAX_GRANT, else ValueError) to its granted units; return its usage now.
        Raises StoreError when the store cannot answer."""


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
        """A store call failed; `operation` is one of admit, release, renew, ready, quota."""


class NullObserver:
    def slots_reclaimed(self, count: int) -> None:
        pass

    def leases_lost(self, count: int) -> None:
        pass

    def store_error(self, operation: str) -> None:
        pass


def check_charge(charge: Charge) -> None:
    """A charge outside its bounds is a bug upstream of the store: refuse it (ValueError)."""
    if not (0 <= charge.cost <= MAX_COST and 1 <= charge.slots <= MAX_SLOTS):
        raise ValueError(f"charge out of bounds: {charge}")


def bounded(settlement: Settlement) -> Settlement:
    """`settlement` with its units held to 0..MAX_COST (a release never raises)."""
    charged = min(max(settlement.charged, 0), MAX_COST)
    settled = min(max(settlement.settled, 0), MAX_COST)
    if (charged, settled) == (settlement.charged, settlement.settled):
        return settlement
    return Settlement(settlement.rates, settlement.quotas, charged, settled, settlement.admitted_at_ms)


def weighted_lease(lease_id: str, slots: int) -> str:
    """The lease id of a request holding `slots` slots in each slot bucket. The count rides in
    the id (`<id>*K`), so every later call on the lease (release, renew, undo, job handover)
    knows its members without being told."""
    return lease_id if slots <= 1 else f"{lease_id}*{slots}"


def lease_members(lease_id: str) -> list[str]:
    """The members a lease holds in a slot bucket: `id`, then `id#2` ... `id#K`."""
    if "*" not in lease_id:  # the common case, on every admission and release
        return [lease_id]
    _, star, count = lease_id.rpartition("*")
    slots = int(count) if star and count.isascii() and count.isdigit() else 1
    return [lease_id] + [f"{lease_id}#{n}" for n in range(2, min(slots, MAX_SLOTS) + 1)]
