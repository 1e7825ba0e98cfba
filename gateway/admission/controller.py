"""The admission decision: the only admission module that awaits.

Theory of operation: the app resolves key and route to an `AdmissionPlan` (pure, cached),
then calls `Admission.admit`, which makes exactly one store call. When the store cannot
answer (error, timeout, or the breaker is open after repeated failures), `store.on_error`
decides, and every such decision is counted:

- `local`: this replica enforces the same buckets in-process until the store answers again
  (limits become per replica; slots taken locally are released locally);
- `allow`: admit without limits (no limit headers: nothing is known);
- `deny`: refuse with 503 `store_unavailable`.

The returned `Ticket` remembers which store holds the lease, so the release always goes
where the slot was taken.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from gateway.admission.breaker import CircuitBreaker
from gateway.admission.buckets import AdmissionPlan
from gateway.config.model import OnError
from gateway.metrics import Metrics
from gateway.store.base import AdmissionStore, AdmitResult, StoreError


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

    @property
    def admitted(self) -> bool:
        return self.result is None or self.result.admitted


# Lease ids: a random per-process prefix and a counter. Unique across replicas and cheap.
_LEASE_PREFIX = os.urandom(6).hex()
_lease_counter = itertools.count()


def new_lease_id() -> str:
    return f"{_LEASE_PREFIX}{next(_lease_counter):x}"


class Admission:
    def __init__(
        self,
        store: AdmissionStore,
        *,
        on_error: OnError,
        metrics: Metrics,
        local: AdmissionStore | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.store = store
        self._on_error = on_error
        self._metrics = metrics
        self._local = local
        self.breaker = breaker or CircuitBreaker()

    @property
    def degraded(self) -> bool:
        return self.breaker.is_open

    async def admit(self, plan: AdmissionPlan) -> Ticket:
        lease_id = new_lease_id()
        if plan.empty:
            return Ticket(lease_id, None, None)
        if self.breaker.allow():
            try:
                result = await self.store.admit(plan.rates, plan.slots, lease_id)
            except StoreError:
                self.breaker.failure()
            else:
                self.breaker.success()
                return Ticket(lease_id, result, self.store if result.admitted and plan.slots else None)
        return await self._fallback(plan, lease_id)

    async def _fallback(self, plan: AdmissionPlan, lease_id: str) -> Ticket:
        self._metrics.fallback_decisions.labels(self._on_error).inc()
        if self._on_error == "deny":
            raise StoreUnavailable(retry_after=max(1, round(self.breaker.seconds_until_probe() + 0.5)))
        if self._on_error == "local" and self._local is not None:
            result = await self._local.admit(plan.rates, plan.slots, lease_id)
            return Ticket(lease_id, result, self._local if result.admitted and plan.slots else None)
        return Ticket(lease_id, None, None)

    def release(self, plan: AdmissionPlan, ticket: Ticket) -> None:
        """Free the ticket's slots (synchronous, idempotent: safe in any `finally`)."""
        if ticket.store is not None:
            store, ticket.store = ticket.store, None
            store.release(plan.slots, ticket.lease_id)
