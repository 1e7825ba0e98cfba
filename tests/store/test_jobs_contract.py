"""The job part of the store contract (gateway/store/jobs.py), on every backend: a lease
handed over to a job keeps its slot until the job ends (by its owner or the admin call) or
max_duration passes; the heartbeat never extends it; an end reported before the handover
still frees the slot; nothing is left behind (the `backend` teardown checks TTLs and empty
slot sets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.store.base import SlotBucket
from gateway.store.jobs import ActiveJob, EndedJob, JobClaim, valid_job_id
from gateway.store.redis_jobs import RedisJobStore
from tests.store.conftest import Backend, DrivenClock, RecordingObserver, rate, slot

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def jobs_of(backend: Backend, store: Any) -> Any:
    return RedisJobStore(store, prefix="t") if backend.is_redis else store


async def started_job(store: Any, jobs: Any, slots: list[SlotBucket], lease: str, job_id: str,
                      owner: str = "k1", max_duration: float = HOUR) -> None:
    assert (await store.admit([], slots, lease)).admitted
    assert await jobs.hand_over(slots, lease, JobClaim(job_id, owner, max_duration))
    store.release(slots, lease)  # what the request's `finally` does: the job keeps the slot


async def test_a_job_holds_its_slot_after_the_request_ends(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock, lease=10.0)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 2)]
    await started_job(store, jobs, crawls, "lease-1", "job-1")
    await store.flush()
    second = await store.admit([], crawls, "lease-2")
    assert (second.admitted, second.slot_counts) == (True, [1])
    assert not (await store.admit([], crawls, "lease-3")).admitted
    store.release(crawls, "lease-2")
    # Well past several leases, with heartbeats: still held, and nothing counted as lost.
    for _ in range(5):
        clock.advance_ms(9_000)
        assert await store.renew() == 0
    held = await store.admit([], crawls, "probe")
    assert held.slot_counts == [1]
    store.release(crawls, "probe")
    assert await jobs.end("job-1", "k1") == EndedJob("job-1", "k1")
    await store.flush()
    assert (await store.admit([], crawls, "after")).slot_counts == [0]
    store.release(crawls, "after")


async def test_only_the_owner_or_the_admin_ends_a_job(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 1)]
    await started_job(store, jobs, crawls, "lease-1", "job-a", owner="alice")
    assert await jobs.end("job-a", "mallory") is None  # a job id seen for another key
    assert not (await store.admit([], crawls, "blocked")).admitted
    assert await jobs.end("job-a", None) == EndedJob("job-a", "alice")  # the upstream's done call
    assert await jobs.end("job-a", None) is None  # idempotent
    assert await jobs.end("job-a", "alice") is None
    await store.flush()
    assert (await store.admit([], crawls, "free")).admitted
    store.release(crawls, "free")


async def test_max_duration_frees_the_slot_whatever_happens(
    backend: Backend, clock: DrivenClock, observer: RecordingObserver
) -> None:
    store = await backend.started(clock=clock, observer=observer)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 1)]
    await started_job(store, jobs, crawls, "lease-1", "job-1", max_duration=60.0)
    clock.advance_ms(59_999)
    assert not (await store.admit([], crawls, "early")).admitted
    clock.advance_ms(1)
    late = await store.admit([], crawls, "late")
    assert (late.admitted, late.reclaimed) == (True, 1)
    assert observer.reclaimed == 1
    store.release(crawls, "late")
    await jobs.end("job-1", "k1")  # a late end is harmless
    await store.flush()
    assert (await store.admit([], crawls, "again")).admitted
    store.release(crawls, "again")


async def test_an_end_reported_before_the_handover_still_frees_the_slot(
    backend: Backend, clock: DrivenClock
) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 1)]
    assert await jobs.end("fast-job", None) is None  # the upstream's call overtook the answer
    assert (await store.admit([], crawls, "lease-1")).admitted
    assert not await jobs.hand_over(crawls, "lease-1", JobClaim("fast-job", "k1", HOUR))
    store.release(crawls, "lease-1")
    await store.flush()
    assert (await store.admit([], crawls, "next")).slot_counts == [0]
    store.release(crawls, "next")


async def test_another_keys_early_end_does_not_cancel_a_handover(
    backend: Backend, clock: DrivenClock
) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 1)]
    assert await jobs.end("job-x", "mallory") is None
    await started_job(store, jobs, crawls, "lease-1", "job-x", owner="alice")
    assert not (await store.admit([], crawls, "blocked")).admitted
    assert await jobs.end("job-x", "alice") == EndedJob("job-x", "alice")


async def test_no_handover_once_the_lease_is_gone(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 1)]
    assert (await store.admit([], crawls, "lease-1")).admitted
    store.release(crawls, "lease-1")
    await store.flush()
    assert not await jobs.hand_over(crawls, "lease-1", JobClaim("job-1", "k1", HOUR))
    assert (await store.admit([], crawls, "next")).admitted
    store.release(crawls, "next")
    assert await jobs.end("job-1", "k1") is None


async def test_handover_touches_only_the_job_buckets(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    requests, crawls = slot("requests", 1), slot("crawls", 1)
    assert (await store.admit([], [requests, crawls], "lease-1")).admitted
    assert await jobs.hand_over([crawls], "lease-1", JobClaim("job-1", "k1", HOUR))
    store.release([requests, crawls], "lease-1")
    await store.flush()
    assert (await store.admit([], [requests], "next")).admitted
    assert not (await store.admit([], [crawls], "blocked")).admitted
    store.release([requests], "next")
    assert await jobs.end("job-1", "k1") is not None


async def test_usage_counts_windows_slots_and_lists_jobs(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    rpm, requests, crawls = rate("rpm", 10, 60_000), slot("requests", 5), slot("crawls", 5)
    assert (await store.admit([rpm], [requests], "r1")).admitted
    await started_job(store, jobs, [crawls], "c1", "job-1", max_duration=120.0)
    clock.advance_ms(1_000)
    await started_job(store, jobs, [crawls], "c2", "job-2", max_duration=120.0)
    await store.flush()
    usage = await jobs.usage([rpm], [requests, crawls])
    assert usage.rate_counts == [1]
    assert usage.slot_counts == [1, 2]
    assert usage.jobs[0] == []
    assert sorted(usage.jobs[1], key=lambda job: job.job_id) == [
        ActiveJob("job-1", 119_000), ActiveJob("job-2", 120_000)
    ]
    clock.advance_ms(60_000)  # the rate window is over; the jobs run on
    later = await jobs.usage([rpm], [requests, crawls])
    assert later.rate_counts == [0]
    store.release([requests], "r1")
    for job_id in ("job-1", "job-2"):
        assert await jobs.end(job_id, "k1") is not None


async def test_a_job_end_wakes_the_waiters_of_its_buckets(backend: Backend, clock: DrivenClock) -> None:
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 1)]
    await started_job(store, jobs, crawls, "lease-1", "job-1")
    event = asyncio.Event()
    unwatch = store.watch(crawls, event)
    try:
        async with asyncio.timeout(2):
            await event.wait()
        event.clear()
        assert await jobs.end("job-1", None) is not None
        async with asyncio.timeout(2):
            await event.wait()
    finally:
        unwatch()


def test_job_ids_are_bounded_text() -> None:
    assert valid_job_id("abc-123") == "abc-123"
    assert valid_job_id(42) == "42"
    for bad in ("", "a" * 201, "a\nb", None, True, 1.5, {"id": 1}, ["x"]):
        assert valid_job_id(bad) is None


async def test_a_replayed_handover_or_end_changes_nothing(backend: Backend, clock: DrivenClock) -> None:
    """Idempotent by job id: a handover sent twice (a retry after a lost reply) answers what
    the first run did and keeps the job's expiry; an end sent again reports nothing more."""
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 1)]
    claim = JobClaim("job-r", "k1", 60.0)
    assert (await store.admit([], crawls, "lease-1")).admitted
    assert await jobs.hand_over(crawls, "lease-1", claim)
    clock.advance_ms(30_000)
    assert await jobs.hand_over(crawls, "lease-1", claim)  # the replay
    store.release(crawls, "lease-1")
    await store.flush()
    usage = await jobs.usage([], crawls)
    assert (usage.slot_counts, usage.jobs) == ([1], [[ActiveJob("job-r", 30_000)]])  # expiry kept
    assert await jobs.end("job-r", "k1") == EndedJob("job-r", "k1")
    assert await jobs.end("job-r", "k1") is None
    assert not await jobs.hand_over(crawls, "lease-1", claim)  # lands after the end: nothing moves
    await store.flush()
    assert (await store.admit([], crawls, "next")).slot_counts == [0]
    store.release(crawls, "next")


async def held_in(jobs: Any, buckets: list[SlotBucket]) -> list[int]:
    return (await jobs.usage([], buckets)).slot_counts


async def test_a_job_id_already_held_by_another_key_is_not_handed_over(
    backend: Backend, clock: DrivenClock
) -> None:
    """job_index.lua's rule on every store: the id is alice's, so bob's handover of the same id
    moves nothing (his request's release frees his slot), and alice's own end still finds it."""
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    alice, bob = [slot("crawls", 1, tag="alice")], [slot("crawls", 1, tag="bob")]
    await started_job(store, jobs, alice, "lease-a", "shared", owner="alice")
    assert (await store.admit([], bob, "lease-b")).admitted
    assert not await jobs.hand_over(bob, "lease-b", JobClaim("shared", "bob", HOUR))
    store.release(bob, "lease-b")
    await store.flush()
    assert (await held_in(jobs, alice), await held_in(jobs, bob)) == ([1], [0])
    assert await jobs.end("shared", "bob") is None
    assert await jobs.end("shared", "alice") == EndedJob("shared", "alice")
    await store.flush()
    assert await held_in(jobs, alice) == [0]


async def test_the_same_keys_running_job_seen_again_holds_one_slot(
    backend: Backend, clock: DrivenClock
) -> None:
    """An upstream that dedupes gives a second request the id of the key's running job: a
    replay of that job's handover, which changes nothing; the second request's slot is freed."""
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 2)]
    await started_job(store, jobs, crawls, "lease-1", "dup")
    assert (await store.admit([], crawls, "lease-2")).admitted
    assert await jobs.hand_over(crawls, "lease-2", JobClaim("dup", "k1", HOUR))
    store.release(crawls, "lease-2")
    await store.flush()
    assert await held_in(jobs, crawls) == [1]
    assert await jobs.end("dup", "k1") == EndedJob("dup", "k1")
    await store.flush()
    assert await held_in(jobs, crawls) == [0]


async def test_an_id_seen_again_after_its_job_ended_holds_nothing(backend: Backend, clock: DrivenClock) -> None:
    """Within the tombstone time an ended job's id is remembered as ended, on every store: a
    handover of it (a late replay, or the id given out again) holds no slot, and the admin
    call reports nothing to end."""
    store = await backend.started(clock=clock)
    jobs = jobs_of(backend, store)
    crawls = [slot("crawls", 2)]
    await started_job(store, jobs, crawls, "lease-1", "again")
    assert await jobs.end("again", "k1") == EndedJob("again", "k1")
    clock.advance_ms(60_000)
    assert (await store.admit([], crawls, "lease-2")).admitted
    assert not await jobs.hand_over(crawls, "lease-2", JobClaim("again", "k1", HOUR))
    store.release(crawls, "lease-2")
    await store.flush()
    assert await held_in(jobs, crawls) == [0]
    assert await jobs.end("again", None) is None
