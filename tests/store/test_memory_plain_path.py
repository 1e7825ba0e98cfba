"""The memory store's short way for the common shape (`MemoryStore._admit_plain`: one exact,
enforced rate log and one enforced slot bucket, a request of one unit and one slot) decides and
writes exactly what the general path (`MemoryStore._admit`) does.

Two stores on one clock take the same random calls: one through `admit` (which picks the short
way whenever the shape allows), the other always through the general path. After every step their
answers and their whole state (logs, owners, leases in order, held leases, the earliest-expiry
bound, job members) must be equal. Shapes near the common one (a shadow or counter bucket, a
quota, two slot buckets, a weighted lease, another cost) check that the choice of path is right."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from gateway.store.base import ONE, Charge, QuotaBucket, RateBucket, SlotBucket, weighted_lease
from gateway.store.jobs import JobClaim
from gateway.store.memory import MemoryStore

LEASE_S = 3.0


class Clock:
    """Seconds with sub-millisecond steps (the store rounds its reads to whole µs)."""

    def __init__(self) -> None:
        self.seconds = 1_000_000.0

    def __call__(self) -> float:
        return self.seconds


def state(store: MemoryStore) -> Any:
    return (
        {key: (w.window_ms, list(w.times), dict(w.owners)) for key, w in store._windows.items()},
        {key: list(leases.items()) for key, leases in store._slots.items()},
        set(store._held),
        store._earliest_expiry,
        {key: dict(members) for key, members in store._jobs.members.items()},
        {key: (c.window, c.count, c.previous) for key, c in store._counters.items()},
        {key: list(q) for key, q in store._quotas.items()},
    )


rate_buckets = st.builds(
    RateBucket,
    key=st.sampled_from(["t:{k}:r:a", "t:{k}:r:b"]),
    limit=st.integers(min_value=0, max_value=3),
    window_ms=st.sampled_from([1_000, 2_500]),
    counts_cost=st.booleans(),
    shadow=st.sampled_from([False, False, False, True]),
)
counter_buckets = st.builds(RateBucket, key=st.just("t:{k}:a:c"), limit=st.integers(0, 3),
                            window_ms=st.just(1_000), exact=st.just(False))
slot_buckets = st.builds(
    SlotBucket,
    key=st.sampled_from(["t:{k}:s:a", "t:{k}:s:b"]),
    limit=st.integers(min_value=0, max_value=3),
    shadow=st.sampled_from([False, False, False, True]),
)
charges = st.sampled_from([ONE, ONE, ONE, Charge(1, 1), Charge(0, 1), Charge(2, 1), Charge(1, 2)])


class PlainVersusGeneral(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.fast = MemoryStore(LEASE_S, clock=self.clock)
        self.general = MemoryStore(LEASE_S, clock=self.clock)
        self.leases: dict[str, tuple[SlotBucket, ...]] = {}
        self.counter = 0
        self.jobs = 0

    def same_state(self) -> None:
        assert state(self.fast) == state(self.general)

    @rule(
        rates=st.one_of(st.lists(rate_buckets, min_size=1, max_size=1), st.lists(rate_buckets, max_size=2),
                        st.lists(counter_buckets, min_size=1, max_size=1)),
        slots=st.one_of(st.lists(slot_buckets, min_size=1, max_size=1),
                        st.lists(slot_buckets, max_size=2, unique_by=lambda s: s.key)),
        quotas=st.sampled_from([(), (), (), (QuotaBucket("t:{k}:q:a", 5, "1d"),)]),
        charge=charges,
        as_tuples=st.booleans(),
        again=st.sampled_from([0, 0, 0, 1, 2]),
    )
    def admit(self, rates: list[RateBucket], slots: list[SlotBucket], quotas: tuple[QuotaBucket, ...],
              charge: Charge, as_tuples: bool, again: int) -> None:
        if not again:  # else an earlier lease id once more (held or not)
            self.counter += 1
        lease_id = weighted_lease(f"lease-{max(1, self.counter - again)}", charge.slots)
        rate_arg: Any = tuple(rates) if as_tuples else rates
        slot_arg: Any = tuple(slots) if as_tuples else slots
        plain = (charge is ONE and not quotas and len(rates) == 1 and len(slots) == 1 and rates[0].exact
                 and not rates[0].shadow and not slots[0].shadow)
        event("plain shape" if plain else "other shape")
        fast = self.loop.run_until_complete(
            self.fast.admit(rate_arg, slot_arg, lease_id, quotas=quotas, charge=charge))
        general = self.general._admit(rate_arg, slot_arg, lease_id, None, quotas, charge)
        assert fast == general
        if plain:
            event(f"plain: {fast.reason or 'admitted'}{', reclaimed' if fast.reclaimed else ''}")
        if fast.admitted and slots:
            self.leases[lease_id] = tuple(slots)
        self.same_state()

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        slots = self.leases.pop(lease_id)
        self.fast.release(slots, lease_id)
        self.general.release(slots, lease_id)
        self.same_state()

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), seconds=st.sampled_from([0.5, 2.0, 6.0]))
    def hand_over(self, data: st.DataObject, seconds: float) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        slots = self.leases.pop(lease_id)
        self.jobs += 1
        claim = JobClaim(f"job-{self.jobs}", "owner", max_duration=seconds)
        moved = self.loop.run_until_complete(self.fast.hand_over(slots, lease_id, claim))
        assert moved == self.loop.run_until_complete(self.general.hand_over(slots, lease_id, claim))
        self.same_state()

    @rule(ms=st.one_of(st.integers(min_value=0, max_value=3_000), st.floats(min_value=0.0, max_value=3_000.0)))
    def advance(self, ms: float) -> None:
        self.clock.seconds += ms / 1000.0

    @rule()
    def heartbeat(self) -> None:
        lost = self.loop.run_until_complete(self.fast.renew())
        assert lost == self.loop.run_until_complete(self.general.renew())
        self.same_state()

    @rule()
    def sweep(self) -> None:
        self.fast._sweep()
        self.general._sweep()
        self.same_state()

    def teardown(self) -> None:
        self.loop.close()


def test_the_plain_path_decides_and_writes_as_the_general_path() -> None:
    run_state_machine_as_test(
        PlainVersusGeneral,
        settings=settings(max_examples=300, stateful_step_count=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )


def test_a_lease_admitted_again_moves_last_on_both_paths() -> None:
    """A lease id admitted again (still held, others taken since) goes last in its bucket's
    expiry order, as the general path puts it."""
    clock = Clock()
    fast, general = MemoryStore(LEASE_S, clock=clock), MemoryStore(LEASE_S, clock=clock)
    rates, slots = (RateBucket("t:{k}:r:a", 10, 1_000),), (SlotBucket("t:{k}:s:a", 5),)
    for lease_id in ("x", "y", "x"):
        clock.seconds += 0.001
        fast_result = asyncio.run(fast.admit(rates, slots, lease_id))
        assert fast_result == general._admit(rates, slots, lease_id, None, (), ONE)
    assert list(fast._slots["t:{k}:s:a"]) == ["y", "x"]
    assert state(fast) == state(general)
