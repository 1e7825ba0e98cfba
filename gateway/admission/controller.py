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

Each request is priced once, before admission (`plan.pricing`: its `Charge`, units and slots);
the slot count rides in the lease id (`weighted_lease`), the units are passed to the store, and
the `Ticket` keeps both, so that `release` can settle the charge (`Ticket.settled`, set by the
forwarder from the upstream's answer) in the same batched store call that frees the slots.

Rate refusals of the shared store are remembered (`RefusalCache`): a refusal by a rate bucket
with `retry_after_ms = t` stays true until t has passed, on every replica, since admissions only
leave a window with time, and for every request costing at least as much (a cheaper one may
fit). Until then such a request is refused here with no store call, its Retry-After counting
down; such a refusal carries no slot counts (they may have changed since), so its headers leave
the concurrency numbers out. Refusals that another replica can undo are remembered for
`QUOTA_REFUSAL_TTL` (1 s) at most: a quota's (an admin grant or reset takes effect here within
that time) and a cost-counting window's (a settlement's refund). Concurrency refusals are never
cached (a slot can free any moment); nor are decisions of the local fallback store or of
`on_error: allow`.

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

from gateway.admission.breaker import CircuitBreaker, DomainBreakers
from gateway.admission.buckets import AdmissionPlan
from gateway.admission.transitions import OutageBridge
from gateway.config.model import OnError
from gateway.metrics import Metrics
from gateway.store.base import (
    ONE,
    AdmissionStore,
    AdmitResult,
    Charge,
    QueueSpot,
    QuotaBucket,
    RateBucket,
    Settlement,
    SlotBucket,
    StoreError,
    StoreRejected,
    WaitingStore,
    weighted_lease,
)

log = logging.getLogger("gateway.admission")

REJECTED_LOG_EVERY = 10.0  # seconds between warnings about admissions the store rejected


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
    charge: Charge = ONE
    # The store whose windows and quotas hold the admission's units (the settlement goes
    # there); None when nothing was counted or the settlement was sent.
    counted_in: AdmissionStore | None = None
    # What the request is finally charged (the forwarder sets it from the upstream's answer).
    settled: int | None = None

    @property
    def admitted(self) -> bool:
        return self.result is None or self.result.admitted


# Lease ids: a random per-process prefix and a counter in hex. Unique across replicas and
# cheap: each `next` runs in C (format the count, prepend the prefix).
_LEASE_PREFIX = os.urandom(6).hex()
_LEASE_IDS = map(_LEASE_PREFIX.__add__, map("%x".__mod__, itertools.count()))


def new_lease_id() -> str:
    return next(_LEASE_IDS)


# How long a refusal that another replica can undo is repeated without asking the store: a
# quota's (an admin grant or reset) and a cost-counting window's (a settlement refunds units
# before they leave with time). A refusal of request-counting windows only holds until its
# window moves.
QUOTA_REFUSAL_TTL = 1.0


@dataclass(slots=True)
class _Refusal:
    plan: AdmissionPlan  # held, so that no other plan can get its id while the entry lives
    asked_at: float  # the clock just before the store call that refused
    deadline: float  # the refusal is exact at least until then
    result: AdmitResult
    cost: int  # the refused request's units: only requests costing as much are refused here

    def at(self, now: float) -> AdmitResult:
        """The refusal as it stands at `now`: Retry-After and the resets count down. No slot
        counts: slots may have been taken or freed since, so the headers omit them; nor do they
        repeat the other limits' numbers (other routes may have spent them)."""
        elapsed_ms = int((now - self.asked_at) * 1000)  # rounded down: never earlier than the store's numbers
        result = self.result
        return AdmitResult(
            False, result.reason, max(1, result.retry_after_ms - elapsed_ms), result.rate_counts,
            [max(0, reset_ms - elapsed_ms) for reset_ms in result.rate_reset_ms], [],
            quota_counts=result.quota_counts, quota_granted=result.quota_granted,
            quota_reset_ms=[max(0, reset_ms - elapsed_ms) for reset_ms in result.quota_reset_ms],
            now_ms=result.now_ms + elapsed_ms, from_cache=True,
        )


class RefusalCache:
    """Rate and quota refusals of the shared store, per plan, until the moment they could end
    (a quota's: `QUOTA_REFUSAL_TTL` at most, grants can end it sooner).

    A refusal of a request costing `c` units is repeated only to requests costing `c` or more:
    every bucket that refused it still lacks room for them, while a cheaper one may fit.

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

    def clear(self) -> None:
        """Forget every refusal (an admin changed a quota through this process)."""
        self._entries.clear()

    def get(self, plan: AdmissionPlan, cost: int = 1) -> AdmitResult | None:
        """The cached refusal of `plan` for a request of `cost` units, counted down to now, or None."""
        if not self._entries:  # the usual case: nothing refused lately
            return None
        entry = self._entries.get(id(plan))
        if entry is None or cost < entry.cost:
            return None
        now = self.clock()
        if now >= entry.deadline:
            del self._entries[id(plan)]
            return None
        return entry.at(now)

    def remember(self, plan: AdmissionPlan, asked_at: float, result: AdmitResult, cost: int = 1) -> None:
        """Keep `result` if it is a rate or quota refusal of a request of `cost` units (the
        store was asked at `asked_at`)."""
        if result.admitted or result.retry_after_ms <= 0:
            return
        if result.reason == "rate":
            lasts = result.retry_after_ms / 1000
            if any(rate.counts_cost for rate in plan.rates):  # a refund elsewhere may make room
                lasts = min(QUOTA_REFUSAL_TTL, lasts)
        elif result.reason == "quota":
            lasts = min(QUOTA_REFUSAL_TTL, result.retry_after_ms / 1000)
        else:
            return
        entries = self._entries
        entries.pop(id(plan), None)  # re-inserted last: the oldest entries are the first to go
        if len(entries) >= self._max_entries:
            self._make_room()
        entries[id(plan)] = _Refusal(plan, asked_at, asked_at + lasts, result, cost)

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
        self.breaker = breaker or CircuitBreaker()  # the store's (Cluster: of calls with no known primary)
        # Cluster: a breaker per primary, so one failing primary sends only its own keys to
        # on_error. None for a store of one server: `self.breaker` alone.
        domain_of = getattr(store, "failure_domain", None)
        self.breakers = DomainBreakers(domain_of, self.breaker) if domain_of is not None else None
        self.refusals = refusals if refusals is not None else RefusalCache()
        # Under `on_error: local`, each store learns of the other's slots still in flight at a
        # switch (gateway/admission/transitions.py).
        self.bridge = OutageBridge(store, local) if on_error == "local" and local is not None else None
        self._failing = False  # the last admission call to the store failed (logged once per streak)
        self._rejected_logged_at = -REJECTED_LOG_EVERY  # the last StoreRejected warning (time.monotonic)
        # The store's synchronous `admit`, if it has one (memory): the same decision without
        # creating and running a coroutine per request.
        self._admit_now: Callable[..., AdmitResult] | None = getattr(store, "synchronous_admit", None)

    @property
    def on_error(self) -> OnError:
        return self._on_error

    @property
    def degraded(self) -> bool:
        """A breaker is open: the store, or one of its primaries, is skipped for now."""
        return self.breaker.is_open if self.breakers is None else self.breakers.is_open

    def _breaker(self, plan: AdmissionPlan) -> CircuitBreaker:
        return self.breaker if self.breakers is None else self.breakers.for_tag(plan.tag)

    def _all_answer(self) -> bool:
        """No breaker has a failure since its last success: the outage, if any, is over."""
        return self.breaker.clean if self.breakers is None else self.breakers.clean

    def store_answered(self, tag: str) -> None:
        """A store call over `tag`'s keys succeeded (a waiting admission, the readiness probe):
        the breaker of `tag`'s primary closes; once every breaker is clean the outage ends, and
        under `local` the slots go back to the store. (`admit` does the same inline: the hot
        path.) The readiness probe's call counts too: else only a client request closed the
        breaker, and a replica the orchestrator had pulled for `/readyz` 503 got none."""
        breaker = self.breaker if self.breakers is None else self.breakers.for_tag(tag)
        if not breaker.clean:
            breaker.success()
        if self._all_answer():
            if self._failing:
                self._store_answers()
            if self.bridge is not None and self.bridge.degraded:
                self.bridge.to_shared()

    async def admit(self, plan: AdmissionPlan, charge: Charge = ONE) -> Ticket:
        """One admission attempt for a request weighing `charge` (its price: `plan.pricing`)."""
        lease_id = next(_LEASE_IDS)  # new_lease_id(), one call less
        if charge is not ONE:  # ONE holds one slot: the plain id (weighted_lease's identity)
            lease_id = weighted_lease(lease_id, charge.slots)
        if plan.empty:
            return Ticket(lease_id, None, None, charge=charge)
        cached = self.refusals.get(plan, charge.cost)
        if cached is not None:
            self._metrics.cached_refusals.inc()
            return Ticket(lease_id, cached, None, charge=charge)
        breaker = self.breaker if self.breakers is None else self.breakers.for_tag(plan.tag)  # (_breaker, inline)
        if breaker.clean or breaker.allow():  # closed with no failure: one flag check
            asked_at = self.refusals.clock()
            try:
                if plan.wait:
                    return await self._admit_waiting(self.store, plan, lease_id, charge)
                admit_now = self._admit_now
                if admit_now is not None:
                    result = admit_now(plan.rates, plan.slots, lease_id, quotas=plan.quotas, charge=charge)
                else:
                    result = await self.store.admit(plan.rates, plan.slots, lease_id, quotas=plan.quotas,
                                                    charge=charge)
            except StoreRejected as exc:  # this call's keys, not the store: nothing for the breaker
                breaker.abandon()
                self._store_rejected(exc)
                return await self._fallback(plan, lease_id, charge, breaker, outage=False)
            except StoreError as exc:
                breaker.failure()
                self._store_failed(exc)
            except BaseException:  # cancelled (client gone): says nothing about the store
                breaker.abandon()
                raise
            else:
                if not breaker.clean:
                    breaker.success()
                if self._failing and self._all_answer():  # (Cluster: every primary)
                    self._store_answers()
                bridge = self.bridge
                if bridge is not None and bridge.degraded and self._all_answer():  # an outage's end
                    bridge.to_shared()
                if result.shadow_refused:
                    self._count_shadow(plan, result)
                if not result.admitted:
                    self.refusals.remember(plan, asked_at, result, charge.cost)
                    return Ticket(lease_id, result, None, charge=charge)
                if plan.slots and bridge is not None:
                    bridge.note_shared(lease_id, plan)  # bridge.admitted(self.store, plan, lease_id)
                # Positional (fields in order): cheaper than keywords on this path.
                return Ticket(lease_id, result, self.store if plan.slots else None, None, charge, self.store)
        return await self._fallback(plan, lease_id, charge, breaker)

    async def _admit_waiting(
        self, store: AdmissionStore, plan: AdmissionPlan, lease_id: str, charge: Charge, arrival: str = ""
    ) -> Ticket:
        rates, slots, quotas = self._buckets(store, plan)
        spot = QueueSpot(lease_id, waiter_ttl_ms(plan.wait), arrival)
        asked_at = self.refusals.clock()
        result = await cast(WaitingStore, store).admit(rates, slots, lease_id, spot, quotas=quotas, charge=charge)
        if store is self.store:  # only the shared store's refusals hold everywhere
            self.store_answered(plan.tag)
            self.refusals.remember(plan, asked_at, result, charge.cost)
        if result.shadow_refused and not result.queued:  # once per request: its decisive check
            self._count_shadow(plan, result)
        if result.admitted and plan.slots and self.bridge is not None:
            self.bridge.admitted(store, plan, lease_id)
        return Ticket(lease_id, result, store if result.admitted and plan.slots else None,
                      store if result.queued else None, charge=charge,
                      counted_in=store if result.admitted else None)

    def _buckets(
        self, store: AdmissionStore, plan: AdmissionPlan
    ) -> tuple[Sequence[RateBucket], Sequence[SlotBucket], Sequence[QuotaBucket]]:
        divisor = self._local_divisor
        if store is self.store or divisor == 1:
            return plan.rates, plan.slots, plan.quotas
        return _divided(plan.rates, divisor), _divided(plan.slots, divisor), _divided(plan.quotas, divisor)

    async def recheck(self, plan: AdmissionPlan, ticket: Ticket) -> Ticket:
        """Try a waiting ticket again, keeping its place; the new ticket may wait on."""
        store = ticket.waiting_in
        if store is None or ticket.result is None:
            return ticket
        try:
            return await self._admit_waiting(store, plan, ticket.lease_id, ticket.charge, ticket.result.arrival)
        except StoreError as exc:
            outage = not isinstance(exc, StoreRejected)
            breaker = self._breaker(plan)
            if store is self.store:
                if outage:
                    breaker.failure()
                    self._store_failed(exc)
                else:
                    breaker.abandon()
                    self._store_rejected(exc)
            self.leave_queue(plan, ticket)
            return await self._fallback(plan, ticket.lease_id, ticket.charge, breaker, outage=outage)

    async def requeue(self, plan: AdmissionPlan, ticket: Ticket, store: AdmissionStore | None) -> Ticket:
        """A waiter whose plan a reload changed, out of the old plan's queues (`leave_queue`),
        checked under the new `plan`: in its place among its waiters (its first arrival, kept
        in `store`), or once, as a new request would be, when the new plan has no `wait`."""
        if plan.wait <= 0 or not plan.slots or ticket.result is None or store is None:
            return await self.admit(plan, ticket.charge)
        ticket.waiting_in = store
        return await self.recheck(plan, ticket)

    def leave_queue(self, plan: AdmissionPlan, ticket: Ticket) -> None:
        """Stop waiting (synchronous, idempotent)."""
        if ticket.waiting_in is not None:
            store, ticket.waiting_in = ticket.waiting_in, None
            cast(WaitingStore, store).leave_queue(plan.slots, ticket.lease_id)

    async def _fallback(self, plan: AdmissionPlan, lease_id: str, charge: Charge, breaker: CircuitBreaker, *,
                        outage: bool = True) -> Ticket:
        """A decision by `on_error`: during an outage, or for one call the store rejected for
        what its keys hold (`outage=False`: the store answers everyone else, so nothing is
        seeded from it or mirrored back, gateway/admission/transitions.py)."""
        self._metrics.fallback_decisions.labels(self._on_error).inc()
        if self._on_error == "deny":
            raise StoreUnavailable(retry_after=max(1, round(breaker.seconds_until_probe() + 0.5)))
        if self._on_error == "local" and self._local is not None:
            local = self._local
            bridge = self.bridge if outage else None
            if bridge is not None:
                await bridge.to_local()
            if plan.wait:
                return await self._admit_waiting(local, plan, lease_id, charge)
            # Each bucket divided by the divisor, under the plan's bucket key (released and
            # settled under it too).
            rates, slots, quotas = self._buckets(local, plan)
            result = await local.admit(rates, slots, lease_id, quotas=quotas, charge=charge)
            if result.shadow_refused:
                self._count_shadow(plan, result)
            if result.admitted and plan.slots and bridge is not None:
                bridge.admitted(local, plan, lease_id)
            return Ticket(lease_id, result, local if result.admitted and plan.slots else None, charge=charge,
                          counted_in=local if result.admitted else None)
        return Ticket(lease_id, None, None, charge=charge)

    def release(self, plan: AdmissionPlan, ticket: Ticket) -> None:
        """Free the ticket's slots and settle its charge (`ticket.settled`) in one batched store
        call (synchronous, idempotent: safe in any `finally`; the settlement goes once)."""
        store = ticket.store
        if store is None and ticket.counted_in is None:
            return  # nothing held, nothing to settle: released already (the app's second call)
        # Without a cost-counting bucket nothing can be re-priced (decided once, at plan build).
        settlement = settlement_of(plan, ticket) if plan.settles else None
        counted, ticket.counted_in = ticket.counted_in, None  # the settlement is decided once
        if store is None:
            if settlement is not None and counted is not None:  # no slots held: the settlement alone
                counted.release((), ticket.lease_id, settlement=settlement)
            return
        ticket.store = None
        bridge = self.bridge
        if bridge is not None:
            if store is self.store and not bridge.shared_mirrored:  # the usual case, no frame
                bridge.forget_shared(ticket.lease_id, None)
            else:
                bridge.released(store, plan, ticket.lease_id)
        if plan.wait:  # someone may be waiting for this slot
            cast(WaitingStore, store).release(plan.slots, ticket.lease_id, wake=True, settlement=settlement)
        else:
            store.release(plan.slots, ticket.lease_id, settlement=settlement)

    def _count_shadow(self, plan: AdmissionPlan, result: AdmitResult) -> None:
        """gateway_shadow_refusals_total: what each shadow limit would have refused."""
        for key in result.shadow_refused:
            self._metrics.shadow_refusals_for(plan.plan, limit_name(plan, key)).inc()

    def _store_failed(self, exc: StoreError) -> None:
        """One log line per failing streak (every failure is counted in the metrics)."""
        if not self._failing:
            self._failing = True
            log.warning("store admission failed, deciding by on_error: %s until it answers again: %s",
                        self._on_error, exc)

    def _store_rejected(self, exc: StoreError) -> None:
        """A warning at most every REJECTED_LOG_EVERY seconds: one bad key under steady traffic
        must not flood the log (every rejection is counted in gateway_store_errors_total)."""
        now = time.monotonic()
        if now - self._rejected_logged_at >= REJECTED_LOG_EVERY:
            self._rejected_logged_at = now
            log.warning("the store could not decide an admission for a reason of its own keys (another program's "
                        "key under the prefix, or a Cluster slot being migrated): on_error: %s decides that "
                        "request, the others go on: %s", self._on_error, exc)

    def _store_answers(self) -> None:
        self._failing = False
        log.info("store answers admissions again")


_Bucket = TypeVar("_Bucket", RateBucket, SlotBucket, QuotaBucket)


def settlement_of(plan: AdmissionPlan, ticket: Ticket) -> Settlement | None:
    """The re-pricing a release must carry: None unless the ticket's units are still counted
    somewhere and were settled to another amount. Only cost-counting buckets are re-priced,
    and never a shadow bucket that would have refused (nothing was written into it)."""
    if ticket.counted_in is None or ticket.result is None or ticket.settled is None:
        return None
    charged, settled = ticket.charge.cost, ticket.settled
    if settled == charged:
        return None
    skipped = ticket.result.shadow_refused
    rates = tuple(rate for rate in plan.rates if rate.counts_cost and rate.key not in skipped)
    quotas = tuple(quota for quota in plan.quotas if quota.counts_cost and quota.key not in skipped)
    if not rates and not quotas:
        return None
    return Settlement(rates, quotas, charged, settled, ticket.result.now_ms)


def limit_name(plan: AdmissionPlan, key: str) -> str:
    """The config name of the limit of the bucket stored under `key` (a metrics label)."""
    for buckets, infos in ((plan.rates, plan.rate_info), (plan.slots, plan.slot_info),
                           (plan.quotas, plan.quota_info)):
        for bucket, info in zip(buckets, infos, strict=False):
            if bucket.key == key:
                return info.name or info.policy.removesuffix(".key")
    return "unknown"


def _divided(buckets: Sequence[_Bucket], divisor: int) -> tuple[_Bucket, ...]:
    """Each bucket's share of its limit on this replica (never below 1: a key stays usable)."""
    return tuple(replace(bucket, limit=max(1, bucket.limit // divisor)) for bucket in buckets)
