"""The admission controller's per-request shortcuts decide as the long way would:

- `AdmissionPlan.empty` and `AdmissionPlan.settles`, computed once when a plan is built, equal
  what the buckets say, and a plan that does not settle never has a settlement to send
  (`settlement_of` is None whatever the ticket), so `Admission.release` can skip asking;
- the store hears the same release (buckets, lease, settlement) as `settlement_of` says;
- lease ids are the per-process prefix and a hex counter, unique, and a one-slot charge keeps
  the plain id (`weighted_lease` is the identity there)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.admission import controller
from gateway.admission.buckets import AdmissionPlan, BucketInfo, plan_settles
from gateway.admission.controller import Admission, Ticket, new_lease_id, settlement_of
from gateway.metrics import Metrics
from gateway.store.base import ONE, AdmitResult, Charge, QuotaBucket, RateBucket, SlotBucket, weighted_lease

rates = st.builds(RateBucket, key=st.sampled_from(["r:a", "r:b", "r:c"]), limit=st.integers(1, 9),
                  window_ms=st.just(1_000), exact=st.booleans(), counts_cost=st.booleans(), shadow=st.booleans())
quotas = st.builds(QuotaBucket, key=st.sampled_from(["q:a", "q:b"]), limit=st.integers(1, 9),
                   period=st.just("1d"), counts_cost=st.booleans(), shadow=st.booleans())
slots = st.builds(SlotBucket, key=st.sampled_from(["s:a", "s:b"]), limit=st.integers(1, 9), shadow=st.booleans())


@st.composite
def plans(draw: Any) -> AdmissionPlan:
    plan_rates = tuple(draw(st.lists(rates, max_size=3, unique_by=lambda b: b.key)))
    plan_slots = tuple(draw(st.lists(slots, max_size=2, unique_by=lambda b: b.key)))
    plan_quotas = tuple(draw(st.lists(quotas, max_size=2, unique_by=lambda b: b.key)))
    info = BucketInfo("x", 1, 0.0)
    return AdmissionPlan("p", plan_rates, (info,) * len(plan_rates), plan_slots, (info,) * len(plan_slots),
                         draw(st.sampled_from([0.0, 1.0])), quotas=plan_quotas, quota_info=(info,) * len(plan_quotas))


@st.composite
def tickets(draw: Any, plan: AdmissionPlan) -> Ticket:
    keys = [bucket.key for bucket in (*plan.rates, *plan.slots, *plan.quotas)]
    result = AdmitResult(True, None, 0, [], [], [], shadow_refused=draw(st.lists(st.sampled_from(keys or ["none"]))),
                         now_ms=1_000.0)
    charge = Charge(draw(st.integers(0, 5)), draw(st.integers(1, 3)))
    ticket = Ticket("lease", draw(st.sampled_from([result, None])), None, charge=charge,
                    counted_in=draw(st.sampled_from([None, "store"])))  # type: ignore[arg-type]
    ticket.settled = draw(st.sampled_from([None, 0, 1, 2, 5, 7]))
    return ticket


@given(plans())
def test_the_precomputed_plan_facts_equal_the_buckets(plan: AdmissionPlan) -> None:
    assert plan.empty == (not plan.rates and not plan.slots and not plan.quotas)
    assert plan.settles == (any(r.counts_cost for r in plan.rates) or any(q.counts_cost for q in plan.quotas))
    assert plan.settles == plan_settles(plan.rates, plan.quotas)
    changed = replace(plan, rates=(), quotas=())  # derived again for the new buckets
    assert (changed.empty, changed.settles) == (not plan.slots, False)


@given(st.data(), plans())
def test_a_plan_that_does_not_settle_never_has_a_settlement(data: st.DataObject, plan: AdmissionPlan) -> None:
    ticket = data.draw(tickets(plan))
    if not plan.settles:
        assert settlement_of(plan, ticket) is None


class RecordingStore:
    def __init__(self) -> None:
        self.released: list[tuple[Any, ...]] = []

    def release(self, slots: Any, lease_id: str, wake: bool = False, *, settlement: Any = None) -> None:
        self.released.append((tuple(slots), lease_id, settlement))


@given(st.data(), plans(), st.booleans())
def test_release_sends_what_settlement_of_says_once(data: st.DataObject, plan: AdmissionPlan, holds: bool) -> None:
    ticket = data.draw(tickets(plan))
    store = RecordingStore()
    ticket.counted_in = store if ticket.counted_in is not None else None  # type: ignore[assignment]
    ticket.store = store if holds else None  # type: ignore[assignment]
    expected = settlement_of(plan, ticket)
    admission = Admission(store, on_error="deny", metrics=Metrics())  # type: ignore[arg-type]
    admission.release(plan, ticket)
    admission.release(plan, ticket)  # a second release (a `finally` after a callback) sends nothing
    if holds:
        assert store.released == [(plan.slots, "lease", expected)]
    else:
        assert store.released == ([((), "lease", expected)] if expected is not None else [])


def test_lease_ids_are_the_prefix_and_a_hex_counter() -> None:
    first = new_lease_id()
    ids = [new_lease_id() for _ in range(300)]
    prefix = controller._LEASE_PREFIX
    assert re.fullmatch(r"[0-9a-f]{12}", prefix)
    start = int(first.removeprefix(prefix), 16)
    assert ids == [f"{prefix}{n:x}" for n in range(start + 1, start + 301)]


async def _admit(charge: Charge) -> Ticket:
    plan = AdmissionPlan("p", (), (), (), (), 0.0)  # empty: admitted without a store call
    return await Admission(RecordingStore(), on_error="deny", metrics=Metrics()).admit(plan, charge)  # type: ignore[arg-type]


def test_a_one_slot_charge_keeps_the_plain_lease_id() -> None:
    for charge in (ONE, Charge(3, 1), Charge(1, 2), Charge(0, 4)):
        lease_id = asyncio.run(_admit(charge)).lease_id
        plain = lease_id.rpartition("*")[0] or lease_id
        assert lease_id == weighted_lease(plain, charge.slots)
        assert ("*" in lease_id) == (charge.slots > 1)


def test_admit_result_init_takes_the_fields_in_order_with_their_defaults() -> None:
    """AdmitResult's written-out __init__ keeps the dataclass's signature (stores construct it
    positionally); a list field left out (None) is a fresh empty list, as its factory gave."""
    import dataclasses
    import inspect

    parameters = list(inspect.signature(AdmitResult.__init__).parameters.values())[1:]
    fields = dataclasses.fields(AdmitResult)
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, field in zip(parameters, fields, strict=True):
        if field.default_factory is not dataclasses.MISSING:
            assert parameter.default is None
        elif field.default is not dataclasses.MISSING:
            assert parameter.default == field.default
        else:
            assert parameter.default is inspect.Parameter.empty
    one, other = AdmitResult(True, None, 0, [], [], []), AdmitResult(True, None, 0, [], [], [])
    assert one == other and one.quota_counts == [] and one.quota_counts is not other.quota_counts
    assert one.shadow_refused is not other.shadow_refused


def test_the_controller_admits_through_the_memory_store_synchronously_unless_admit_is_redefined() -> None:
    from gateway.store.memory import MemoryStore

    class Redefined(MemoryStore):
        async def admit(self, *args: Any, **kwargs: Any) -> AdmitResult:
            return await super().admit(*args, **kwargs)

    assert MemoryStore(1.0).synchronous_admit is not None
    assert Redefined(1.0).synchronous_admit is None
    assert getattr(RecordingStore(), "synchronous_admit", None) is None
    plan = AdmissionPlan("p", (RateBucket("r:a", 1, 1_000),), (BucketInfo("r", 1, 1.0),),
                         (SlotBucket("s:a", 1),), (BucketInfo("s", 1, 0.0),), 0.0)
    for store in (MemoryStore(1.0), Redefined(1.0)):
        admission = Admission(store, on_error="deny", metrics=Metrics())
        first = asyncio.run(admission.admit(plan))
        second = asyncio.run(admission.admit(plan))
        assert first.admitted and first.store is store and first.counted_in is store
        assert (second.admitted, second.result.reason if second.result else None) == (False, "rate")
