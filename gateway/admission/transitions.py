"""Slots that cross an outage under `on_error: local`: each store learns of the requests the
other one admitted and that are still in flight, so the switch costs little over-admission.

- To local (the first local decision of an outage): every shared slot this replica still
  holds is seeded into the local store as a lease, released with its request, so local
  admission counts those requests.
- Back to the store (its first answer after local decisions): every local slot still held is
  mirrored into the store as a lease (in the background, one admission call per slot with no
  limit; renewed by the heartbeat, released with its request), so the store counts them too.

The requests are noted per lease id as they are admitted (one dict entry per request in
flight, only under `on_error: local`). The bounds this leaves are in docs/failure-modes.md
("Outage transitions").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

from gateway.admission.buckets import AdmissionPlan
from gateway.store.base import AdmissionStore, SlotBucket, StoreError, StoreRejected

log = logging.getLogger("gateway.admission")

_NO_LIMIT = 1 << 30


def unbounded(slots: Sequence[SlotBucket]) -> tuple[SlotBucket, ...]:
    """The same buckets with no limit: a mirrored lease is always taken."""
    return tuple(replace(slot, limit=_NO_LIMIT) for slot in slots)


class _Side:
    """One store's slots held by this replica, and which of them the other store mirrors."""

    def __init__(self) -> None:
        self.held: dict[str, AdmissionPlan] = {}  # lease id -> plan
        self.mirrored: set[str] = set()  # lease ids also held (as a lease) in the other store


class OutageBridge:
    def __init__(self, shared: AdmissionStore, local: AdmissionStore) -> None:
        self._shared_store = shared
        self._local_store = local
        self._shared = _Side()
        self._local = _Side()
        self.degraded = False  # local decisions since the store last answered (read-only outside)
        self._tasks: set[asyncio.Task[None]] = set()
        # The shared store's common case, for the admission's hot path (no Python frame):
        # `admitted(shared, plan, lease_id)` is `note_shared(lease_id, plan)`, and while
        # `shared_mirrored` is empty, `released(shared, plan, lease_id)` is
        # `forget_shared(lease_id, None)` (tests/unit/test_outage_bridge_fast_path.py).
        self.note_shared = self._shared.held.__setitem__
        self.forget_shared = self._shared.held.pop
        self.shared_mirrored = self._shared.mirrored  # (the same set: never rebound)

    def admitted(self, store: AdmissionStore, plan: AdmissionPlan, lease_id: str) -> None:
        """A request holds slots of `store` (called for admissions with slots only)."""
        (self._shared if store is self._shared_store else self._local).held[lease_id] = plan

    def released(self, store: AdmissionStore, plan: AdmissionPlan, lease_id: str) -> None:
        side = self._shared if store is self._shared_store else self._local  # (no tuple per release)
        side.held.pop(lease_id, None)
        if lease_id in side.mirrored:
            side.mirrored.discard(lease_id)
            other = self._local_store if side is self._shared else self._shared_store
            other.release(plan.slots, lease_id)

    async def to_local(self) -> None:
        """Before a local decision: on the first of an outage, seed the shared slots held."""
        if self.degraded:
            return
        self.degraded = True
        side = self._shared
        for lease_id, plan in list(side.held.items()):
            if lease_id not in side.mirrored and lease_id in side.held:
                side.mirrored.add(lease_id)
                await self._local_store.admit([], unbounded(plan.slots), lease_id)

    def to_shared(self) -> None:
        """The store answered: after an outage, mirror the local slots still held into it."""
        if not self.degraded:  # (callers check it first: the usual case costs no call)
            return
        self.degraded = False
        pending = [(lease_id, plan) for lease_id, plan in self._local.held.items()
                   if lease_id not in self._local.mirrored]
        if pending:
            task = asyncio.get_running_loop().create_task(self._mirror_local(pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _mirror_local(self, pending: list[tuple[str, AdmissionPlan]]) -> None:
        side = self._local
        for lease_id, plan in pending:
            if lease_id not in side.held:
                continue  # ended meanwhile
            try:
                result = await self._shared_store.admit([], unbounded(plan.slots), lease_id)
            except StoreRejected:  # this lease's keys hold what no script can use: the others go on
                continue
            except StoreError as exc:  # the store failed again: its next switch seeds afresh
                log.info("mirroring local slots into the store stopped: %s", exc)
                return
            if not result.admitted:
                continue
            if lease_id in side.held:
                side.mirrored.add(lease_id)
            else:  # the request ended while its mirror was being taken
                self._shared_store.release(plan.slots, lease_id)

    async def settled(self) -> None:
        """Wait for mirroring in progress (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
