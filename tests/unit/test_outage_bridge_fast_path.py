"""The admission's hot path reaches into the outage bridge without a Python frame
(`note_shared`, `forget_shared`, `shared_mirrored`, `degraded`): it must record exactly what
`admitted` / `released` / `to_shared` would have in the usual case (no outage in progress,
nothing mirrored), and go through them otherwise."""

from __future__ import annotations

import asyncio

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission
from gateway.admission.transitions import OutageBridge
from gateway.metrics import Metrics
from gateway.store.base import SlotBucket, StoreRejected
from gateway.store.memory import MemoryStore


def _plan(limit: int = 5) -> AdmissionPlan:
    return AdmissionPlan("p", rates=(), rate_info=(), slots=(SlotBucket("gw:{k:1}:c:requests", limit),),
                         slot_info=(BucketInfo("requests", limit, 0.0),), wait=0.0)


def test_fast_forms_are_the_methods_in_the_usual_case() -> None:
    shared, local = MemoryStore(30.0), MemoryStore(30.0)
    slow, fast = OutageBridge(shared, local), OutageBridge(shared, local)
    plan = _plan()
    for lease_id in ("a", "b", "c"):
        slow.admitted(shared, plan, lease_id)
        fast.note_shared(lease_id, plan)
    assert slow._shared.held == fast._shared.held
    assert not fast.shared_mirrored and fast.shared_mirrored is fast._shared.mirrored
    for lease_id in ("b", "zzz"):
        slow.released(shared, plan, lease_id)
        fast.forget_shared(lease_id, None)
    assert slow._shared.held == fast._shared.held == {"a": plan, "c": plan}


def test_admission_goes_through_the_bridge_around_an_outage() -> None:
    async def run() -> None:
        shared, local = MemoryStore(30.0), MemoryStore(30.0)
        admission = Admission(shared, on_error="local", local=local, metrics=Metrics())
        bridge = admission.bridge
        assert bridge is not None
        plan = _plan()
        first = await admission.admit(plan)
        assert first.admitted and bridge._shared.held == {first.lease_id: plan}
        # An outage: the shared slot still held is seeded into the local store (mirrored).
        await bridge.to_local()
        assert bridge.degraded and first.lease_id in bridge.shared_mirrored
        # The store answers again: the next admission runs to_shared (degraded is cleared).
        second = await admission.admit(plan)
        assert not bridge.degraded and second.admitted
        # A mirrored lease takes the slow release: its local mirror is freed too.
        admission.release(plan, first)
        assert first.lease_id not in bridge.shared_mirrored and first.lease_id not in bridge._shared.held
        admission.release(plan, second)
        assert bridge._shared.held == {}
        probe = await local.admit([], [SlotBucket("gw:{k:1}:c:requests", 1)], "probe")
        assert probe.admitted  # nothing left held locally
        await bridge.settled()

    asyncio.run(run())


def test_mirroring_after_an_outage_skips_a_lease_the_store_rejects_and_goes_on() -> None:
    """A rejected lease (its key holds another program's value) is no store failure: the other
    local slots are still mirrored into the store."""

    class Rejecting(MemoryStore):
        async def admit(self, rates, slots, lease_id, *args, **kwargs):  # type: ignore[no-untyped-def]
            if lease_id == "bad":
                raise StoreRejected("WRONGTYPE ... script: 1, on @user_script:3.")
            return await super().admit(rates, slots, lease_id, *args, **kwargs)

    async def run() -> None:
        shared, local = Rejecting(30.0), MemoryStore(30.0)
        bridge = OutageBridge(shared, local)
        plan = _plan()
        await bridge.to_local()
        for lease_id in ("first", "bad", "last"):
            bridge.admitted(local, plan, lease_id)
        bridge.to_shared()
        await bridge.settled()
        assert bridge._local.mirrored == {"first", "last"}

    asyncio.run(run())
