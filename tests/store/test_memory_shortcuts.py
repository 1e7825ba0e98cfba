"""The memory store's shortcuts on the admission path take the decisions the long way would:
the clock's rounding to whole µs without round(), and the earliest-expiry bound that lets an
admission skip the purge scans (an expired lease or job must still be reclaimed on time)."""

from __future__ import annotations

import math
import random
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.store.base import Charge, QuotaBucket
from gateway.store.jobs import JobClaim
from gateway.store.memory import MemoryStore, _round_to_us
from tests.store.conftest import DrivenClock, RecordingObserver, slot

pytestmark = pytest.mark.anyio

LEASE_MS = 10_000


def same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b)  # tells -0.0 from 0.0


def half_us_values() -> list[float]:
    """Times (ms) whose µs value is a half-integer, and their neighbours: the ties and near
    ties, where rounding the float product and rounding the exact decimal can part."""
    rng = random.Random(5)
    values = []
    for magnitude in (10, 10**4, 10**7, 10**10, 10**12):
        for _ in range(2000):
            ms = (rng.randrange(1, magnitude) + 0.5) / 1000.0
            values += [ms, math.nextafter(ms, 0.0), math.nextafter(ms, math.inf)]
    return values


def test_rounding_to_whole_us_equals_round_at_ties_and_near_them() -> None:
    mismatches = [ms for ms in half_us_values() if not same_float(_round_to_us(ms), round(ms, 3))]
    assert mismatches == []


@given(st.floats(allow_nan=False) | st.floats(min_value=0.0, max_value=1e13))
def test_rounding_to_whole_us_equals_round(ms: float) -> None:
    assert same_float(_round_to_us(ms), round(ms, 3))


def test_the_clock_reads_in_ms_rounded_to_whole_us() -> None:
    for seconds in (0.0, 1e-7, 0.0000005, 1.2345675, 86_400.123456789, 3.6e9 + 0.1):
        store = MemoryStore(10.0, clock=lambda seconds=seconds: seconds)
        assert same_float(store._now(), round(seconds * 1000.0, 3))


async def test_a_later_lease_does_not_postpone_an_earlier_ones_expiry(
    clock: DrivenClock, observer: RecordingObserver
) -> None:
    store = MemoryStore(LEASE_MS / 1000, clock=clock, observer=observer)
    bucket = [slot("s", 2)]
    assert (await store.admit([], bucket, "first")).admitted  # expires at +10 s
    clock.advance_ms(5_000)
    assert (await store.admit([], [slot("other", 1)], "later")).admitted  # at +15 s
    clock.advance_ms(5_000)
    result = await store.admit([], bucket, "next")
    assert (result.admitted, result.slot_counts, result.reclaimed) == (True, [0], 1)
    assert observer.reclaimed == 1


async def test_a_job_shorter_than_the_lease_is_reclaimed_when_it_runs_out(
    clock: DrivenClock, observer: RecordingObserver
) -> None:
    store = MemoryStore(LEASE_MS / 1000, clock=clock, observer=observer)
    bucket = [slot("crawls", 1)]
    assert (await store.admit([], bucket, "lease")).admitted
    assert await store.hand_over(bucket, "lease", JobClaim("job-1", "k1", max_duration=1.0))
    store.release(bucket, "lease")
    clock.advance_ms(1_000)
    result = await store.admit([], bucket, "after")
    assert (result.admitted, result.reclaimed) == (True, 1)
    assert observer.reclaimed == 1


async def test_the_sweep_keeps_the_earliest_expiry_of_every_bucket_and_job(clock: DrivenClock) -> None:
    store = MemoryStore(LEASE_MS / 1000, clock=clock)
    first, second, crawls = [slot("first", 1)], [slot("second", 1)], [slot("crawls", 1)]
    assert (await store.admit([], first, "a")).admitted  # expires at +10 s
    clock.advance_ms(2_000)
    assert (await store.admit([], second, "b")).admitted  # at +12 s
    assert (await store.admit([], crawls, "c")).admitted
    assert await store.hand_over(crawls, "c", JobClaim("job-1", "k1", max_duration=5.0))  # at +7 s
    store.release(crawls, "c")
    clock.advance_ms(1_000)
    store._sweep()  # nothing expired yet
    clock.advance_ms(4_000)  # +7 s: the job is over
    assert (await store.admit([], crawls, "d")).reclaimed == 1  # holds crawls until +17 s
    clock.advance_ms(1_000)
    store._sweep()
    clock.advance_ms(2_000)  # +10 s: "a" is over
    result = await store.admit([], first, "e")
    assert (result.admitted, result.reclaimed) == (True, 1)


async def test_a_lease_renewed_after_the_clock_stepped_back_expires_on_its_new_expiry(
    clock: DrivenClock,
) -> None:
    store = MemoryStore(LEASE_MS / 1000, clock=clock)
    bucket = [slot("s", 1)]
    assert (await store.admit([], bucket, "held")).admitted  # expires at +10 s
    clock.advance_ms(-5_000)  # an injected clock may step back
    assert await store.renew() == 0  # now expires at +5 s
    clock.advance_ms(10_000)
    result = await store.admit([], bucket, "next")
    assert (result.admitted, result.reclaimed) == (True, 1)


async def test_quota_periods_follow_the_wall_clock_while_windows_run_on_monotonic_time() -> None:
    """The default clock is time.monotonic (a wall-clock step must not move a window), but a
    quota's period is a UTC calendar day: the memory store puts it on the wall clock."""
    store = MemoryStore(10.0)
    daily = QuotaBucket("t:{k1}:q:daily", 5, "1d")
    result = await store.admit([], [], "a", quotas=[daily], charge=Charge(2))
    to_midnight = 86_400_000 - (time.time() * 1000) % 86_400_000
    assert abs(result.quota_reset_ms[0] - to_midnight) < 1_000
    assert (await store.usage([], [], [daily])).quotas[0].used == 2
