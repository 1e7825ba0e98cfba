"""Job observers and the wait loop over the in-process store: a 2xx answer with an id hands
the slot to the job, status answers end it for the owner only, and a waiting request is
admitted when a slot frees, gives up when its wait runs out, and leaves at once when its
client disconnects (body messages read meanwhile are replayed in order)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.admission import waiting
from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission
from gateway.config.model import Job, Route, Store
from gateway.jobs.table import JobTable
from gateway.jobs.tracker import JobReport, JobStart, JobTracker
from gateway.metrics import Metrics
from gateway.store import bundle_for
from gateway.store.base import SlotBucket
from gateway.store.memory import MemoryStore

pytestmark = pytest.mark.anyio

CRAWLS = SlotBucket("gw:{k:1}:c:crawls", 1)
JOB = Job("crawls", "data.id", "/crawl/{id}", "status", ("completed", "cancelled"), 3600.0)
ROUTE = Route("/crawl", frozenset({"POST"}), (), job=JOB)
PLAN = AdmissionPlan("p", (), (), (CRAWLS,), (BucketInfo("crawls", 1, 0.0),), 0.0)
JSON = [(b"Content-Type", b"application/json")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def held(store: MemoryStore) -> int:
    return (await store.usage([], [CRAWLS])).slot_counts[0]


async def start_job(store: MemoryStore, tracker: JobTracker, admission: Admission, body: dict[str, Any],
                    status: int = 201) -> None:
    ticket = await admission.admit(PLAN)
    assert ticket.admitted
    observer = tracker.observer(JobTable([ROUTE]), "alice", ROUTE, "POST", "/crawl", PLAN, ticket)
    assert isinstance(observer, JobStart)
    if await observer.head(status, JSON):
        data = json.dumps(body).encode()
        await observer.chunk(data[:5])
        await observer.chunk(data[5:])
        await observer.end()
    admission.release(PLAN, ticket)


async def report(
    tracker: JobTracker, method: str, job_id: str, owner: str, status: int, body: dict[str, Any]
) -> None:
    anywhere = Route("/**", None, ())
    observer = tracker.observer(
        JobTable([ROUTE]), owner, anywhere, method, f"/crawl/{job_id}", PLAN, None  # type: ignore[arg-type]
    )
    assert isinstance(observer, JobReport)
    if await observer.head(status, JSON):
        await observer.chunk(json.dumps(body).encode())
        await observer.end()


async def test_the_slot_passes_to_the_job_and_only_its_owner_ends_it() -> None:
    store = MemoryStore(30.0)
    tracker = JobTracker(bundle_for(store, Store(prefix="gw", on_error="deny")).job_stores())
    admission = Admission(store, on_error="deny", metrics=Metrics())
    await start_job(store, tracker, admission, {"data": {"id": "j1"}, "status": "queued"})
    assert await held(store) == 1  # the request ended; the job holds the slot
    await report(tracker, "GET", "j1", "alice", 200, {"status": "running"})
    await report(tracker, "GET", "j1", "mallory", 200, {"status": "completed"})
    await report(tracker, "GET", "j1", "alice", 404, {"status": "completed"})
    assert await held(store) == 1
    await report(tracker, "GET", "j1", "alice", 200, {"status": "completed"})
    assert await held(store) == 0


async def test_a_delete_that_succeeds_ends_the_job() -> None:
    store = MemoryStore(30.0)
    tracker = JobTracker(bundle_for(store, Store(prefix="gw", on_error="deny")).job_stores())
    admission = Admission(store, on_error="deny", metrics=Metrics())
    await start_job(store, tracker, admission, {"data": {"id": "j2"}})
    await report(tracker, "DELETE", "j2", "alice", 500, {})
    assert await held(store) == 1
    await report(tracker, "DELETE", "j2", "alice", 200, {})
    assert await held(store) == 0


async def test_no_job_without_a_2xx_and_an_id() -> None:
    store = MemoryStore(30.0)
    tracker = JobTracker(bundle_for(store, Store(prefix="gw", on_error="deny")).job_stores())
    admission = Admission(store, on_error="deny", metrics=Metrics())
    await start_job(store, tracker, admission, {"data": {"id": "j3"}}, status=503)
    await start_job(store, tracker, admission, {"data": {"other": 1}})
    await start_job(store, tracker, admission, {"data": {"id": ""}})
    assert await held(store) == 0


WAITING = AdmissionPlan(
    "p", (), (), (SlotBucket("gw:{k:2}:c:requests", 1),), (BucketInfo("requests", 1, 0.0),), 2.0
)


class Client:
    """An ASGI `receive` fed by the test."""

    def __init__(self, *messages: dict[str, Any]) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for message in messages:
            self.queue.put_nowait(message)

    async def __call__(self) -> dict[str, Any]:
        return await self.queue.get()


async def test_a_waiter_is_admitted_when_the_slot_frees_and_replays_the_body() -> None:
    store = MemoryStore(30.0)
    admission = Admission(store, on_error="deny", metrics=Metrics())
    holder = await admission.admit(WAITING)
    assert holder.admitted
    client = Client({"type": "http.request", "body": b"part-2", "more_body": True},
                    {"type": "http.request", "body": b"end", "more_body": False})
    task = asyncio.create_task(waiting.wait(admission, WAITING, await admission.admit(WAITING), client))
    await asyncio.sleep(0.1)
    assert not task.done()
    admission.release(WAITING, holder)  # wakes the waiter at once (no timer)
    ticket, receive = await asyncio.wait_for(task, 0.04)
    assert ticket.admitted and ticket.waiting_in is None
    assert [await receive(), await receive()] == [
        {"type": "http.request", "body": b"part-2", "more_body": True},
        {"type": "http.request", "body": b"end", "more_body": False},
    ]
    admission.release(WAITING, ticket)


async def test_a_wait_that_runs_out_leaves_the_queue() -> None:
    store = MemoryStore(30.0)
    admission = Admission(store, on_error="deny", metrics=Metrics())
    plan = AdmissionPlan("p", (), (), WAITING.slots, WAITING.slot_info, 0.2)
    holder = await admission.admit(plan)
    ticket, _ = await waiting.wait(admission, plan, await admission.admit(plan), Client())
    assert ticket.result is not None
    assert (ticket.admitted, ticket.waiting_in, ticket.result.reason) == (False, None, "concurrency")
    admission.release(plan, holder)
    assert store._queues.live(plan.slots[0].key, store._now()) == {}


async def test_a_client_that_disconnects_leaves_the_queue_at_once() -> None:
    store = MemoryStore(30.0)
    admission = Admission(store, on_error="deny", metrics=Metrics())
    holder = await admission.admit(WAITING)
    client = Client()
    task = asyncio.create_task(waiting.wait(admission, WAITING, await admission.admit(WAITING), client))
    await asyncio.sleep(0.05)
    assert len(store._queues.live(WAITING.slots[0].key, store._now())) == 1
    client.queue.put_nowait({"type": "http.disconnect"})
    ticket, receive = await asyncio.wait_for(task, 0.2)
    assert not ticket.admitted
    assert store._queues.live(WAITING.slots[0].key, store._now()) == {}
    assert await receive() == {"type": "http.disconnect"}
    admission.release(WAITING, holder)


def _slots(limit: int, name: str = "requests", wait: float = 2.0) -> AdmissionPlan:
    return AdmissionPlan("p", (), (), (SlotBucket(f"gw:{{k:2}}:c:{name}", limit),), (BucketInfo(name, limit, 0.0),), wait)


class Reload:
    """A waiter's `replan`: the plan in force, which the test changes as a reload would."""

    def __init__(self, plan: AdmissionPlan | None) -> None:
        self.plan = plan

    def __call__(self) -> AdmissionPlan | None:
        return self.plan


async def _queued(admission: Admission, plan: AdmissionPlan, reload: Reload) -> asyncio.Task[Any]:
    ticket = await admission.admit(plan)
    assert ticket.waiting_in is not None
    task = asyncio.create_task(waiting.wait(admission, plan, ticket, Client(), reload))
    await asyncio.sleep(0.05)
    assert not task.done()
    return task


async def test_a_reload_that_raises_the_limit_admits_a_waiter_at_once() -> None:
    # Before, a waiter kept the limit it arrived with: 2 slots free under the new limit of 3,
    # and it waited on until its `wait` ran out, then got a 429 saying "limit 1".
    store = MemoryStore(30.0)
    admission = Admission(store, on_error="deny", metrics=Metrics())
    old, new = _slots(1), _slots(3)
    holder = await admission.admit(old)
    reload = Reload(old)
    task = await _queued(admission, old, reload)
    reload.plan = new
    ticket, _ = await asyncio.wait_for(task, 1.0)  # the next check (recheck_interval: 0.5 s)
    assert ticket.admitted
    assert store._queues.live(new.slots[0].key, store._now()) == {}
    admission.release(new, ticket)
    admission.release(old, holder)


async def test_a_reload_that_lowers_the_limit_holds_a_waiter_to_the_new_one() -> None:
    # Before, a waiter was admitted by the old limit after the reload lowered it.
    store = MemoryStore(30.0)
    admission = Admission(store, on_error="deny", metrics=Metrics())
    old, new = _slots(3), _slots(1)
    holders = [await admission.admit(old) for _ in range(3)]
    reload = Reload(old)
    task = await _queued(admission, old, reload)
    reload.plan = new
    await asyncio.sleep(0.6)  # it has checked under the new plan
    admission.release(old, holders.pop())  # 2 held: a slot under the old limit, none under the new
    await asyncio.sleep(0.6)
    assert not task.done()
    for holder in holders:
        admission.release(old, holder)
    ticket, _ = await asyncio.wait_for(task, 1.0)
    assert ticket.admitted
    admission.release(new, ticket)


async def test_a_waiter_whose_key_a_reload_removed_stops_waiting_and_leaves_the_queues() -> None:
    store = MemoryStore(30.0)
    admission = Admission(store, on_error="deny", metrics=Metrics())
    plan = _slots(1)
    holder = await admission.admit(plan)
    reload = Reload(plan)
    task = await _queued(admission, plan, reload)
    reload.plan = None
    ticket, _ = await asyncio.wait_for(task, 1.0)
    assert not ticket.admitted and ticket.waiting_in is None
    assert store._queues.live(plan.slots[0].key, store._now()) == {}
    admission.release(plan, holder)


async def test_a_waiter_moved_to_a_renamed_bucket_leaves_the_old_queue_and_keeps_its_place() -> None:
    store = MemoryStore(30.0)
    admission = Admission(store, on_error="deny", metrics=Metrics())
    old, new = _slots(1, "requests"), _slots(1, "slots")
    first = await admission.admit(old)
    new_holder = await admission.admit(new)  # the new bucket is full too
    reload = Reload(old)
    task = await _queued(admission, old, reload)
    reload.plan = new
    await asyncio.sleep(0.6)
    assert store._queues.live(old.slots[0].key, store._now()) == {}
    assert len(store._queues.live(new.slots[0].key, store._now())) == 1
    admission.release(new, new_holder)
    ticket, _ = await asyncio.wait_for(task, 1.0)
    assert ticket.admitted
    admission.release(new, ticket)
    admission.release(old, first)
