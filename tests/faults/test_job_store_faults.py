"""Job bookkeeping under one fault at any step, on a real redis-server behind a one-shot
fault proxy (tests/support/one_shot_fault.py).

For each job script (index and handover when the slot passes to the job; free and drop when
it ends), each fault (the connection cut after the command was forwarded and before its
reply; no reply, so the call times out; the command landing after the client gave up), and
each way a job ends (the upstream's done status, `DELETE`, the admin `done` call,
`max_duration`): what the handover told the gateway matches what Redis holds, and once the
job ended its slot is free and nothing is left without a TTL. A `crawls: 1` key stays
usable: the next request is admitted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest
import redis.asyncio as aredis

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.config.model import Job, Route, Store
from gateway.jobs.table import JobTable
from gateway.jobs.tracker import JobReport, JobStart, JobTracker
from gateway.store import bundle_for, scripts
from gateway.store.base import SlotBucket
from gateway.store.redis import RedisStore
from tests.store.conftest import assert_no_leaks
from tests.support.one_shot_fault import OneShotFaultProxy
from tests.support.redis_server import PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

TIMEOUT = 0.2
LATE_BY = 0.5  # > TIMEOUT: the late command lands after the client gave up
MAX_DURATION = 1.5
HANDOVER_SCRIPTS = ("job_index", "job_handover")
END_SCRIPTS = ("job_free", "job_drop")
ENDINGS = ("done", "delete", "admin", "max_duration")
ACTIONS = ("cut", "mute", "late")

CASES = [
    pytest.param(script, action, ending, id=f"{script}-{action}-{ending}")
    for script in (*HANDOVER_SCRIPTS, *END_SCRIPTS)
    for action in ACTIONS
    for ending in ENDINGS
    if not (script in END_SCRIPTS and ending == "max_duration")  # nothing is sent to end it
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateRedis]:
    with private_redis() as started:
        yield started


@pytest.fixture(scope="module")
def proxy(server: PrivateRedis) -> Iterator[OneShotFaultProxy]:
    markers = tuple(scripts.load(name).sha.encode() for name in (*HANDOVER_SCRIPTS, *END_SCRIPTS))
    with OneShotFaultProxy(server.port, late_by=LATE_BY, markers=markers) as started:
        yield started


def job_for(max_duration: float) -> Job:
    return Job("crawls", "data.id", "/crawl/{id}", "status", ("completed",), max_duration)


async def held(client: aredis.Redis, crawls: SlotBucket) -> list[str]:
    members = await client.zrange(crawls.key, 0, -1)
    return [member.decode() for member in members]


@pytest.mark.parametrize(("script", "action", "ending"), CASES)
async def test_a_jobs_slot_is_freed_whatever_single_call_failed(
    server: PrivateRedis, proxy: OneShotFaultProxy, script: str, action: str, ending: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tag = f"{script}-{action}-{ending}"
    crawls = SlotBucket(f"t:{{{tag}}}:s:crawls", 1)
    job_id = f"job-{tag}"  # one job index per case
    plan = AdmissionPlan("p", (), (), (crawls,), (BucketInfo("crawls", 1, 0.0),), 0.0)
    job = job_for(MAX_DURATION if ending == "max_duration" else 3600.0)
    route = Route("/crawl", frozenset({"POST"}), (), job=job)
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix="t", timeout=TIMEOUT, lease=10.0)
    await store.start()
    tracker = JobTracker(bundle_for(store, Store(prefix="t", on_error="deny")).job_stores())
    jobs = tracker.primary
    assert jobs is not None
    direct = aredis.Redis(port=server.port)
    struck = proxy.struck
    try:
        # The request that starts the job, its 2xx answer carrying the id, its release.
        assert (await store.admit([], [crawls], "lease-1")).admitted
        if script in HANDOVER_SCRIPTS:
            proxy.arm(scripts.load(script).sha.encode(), action)  # type: ignore[arg-type]
        start = JobStart(jobs, (crawls,), "lease-1", "alice", job)
        assert await start.head(201, [(b"content-type", b"application/json")])
        await start.chunk(json.dumps({"data": {"id": job_id}}).encode())
        store.release([crawls], "lease-1")
        await store.flush()
        handed_over = not any("handover" in r.getMessage() and "freed" in r.getMessage() for r in caplog.records)

        # What the gateway was told matches what Redis holds.
        assert await held(direct, crawls) == ([f"j:{job_id}"] if handed_over else [])

        if script in END_SCRIPTS:
            proxy.arm(scripts.load(script).sha.encode(), action)  # type: ignore[arg-type]
        if ending == "admin":
            await tracker.end(job_id, None)
        elif ending in ("done", "delete"):
            method = "DELETE" if ending == "delete" else "GET"
            report = tracker.observer(JobTable([route]), "alice", Route("/**", None, ()), method,
                                      f"/crawl/{job_id}", plan, None)  # type: ignore[arg-type]
            assert isinstance(report, JobReport)
            if await report.head(200, [(b"content-type", b"application/json")]):
                await report.chunk(json.dumps({"status": "completed"}).encode())
                await report.end()
        else:
            await asyncio.sleep(MAX_DURATION)
        assert proxy.struck == struck + 1, "the fault was never dealt"

        if action == "late":
            await asyncio.sleep(LATE_BY + 0.2)  # the late command has landed by now
        nxt = await store.admit([], [crawls], "next")
        assert nxt.admitted, f"slot still held: {await held(direct, crawls)}"
        store.release([crawls], "next")
        await store.flush()
        assert await held(direct, crawls) == []
    finally:
        await store.aclose()
        await direct.aclose()
    async with aredis.Redis(port=server.port) as client:
        await assert_no_leaks(client)
