"""What a job request asks the upstream for, and the scan of its answer in its coding
(gateway/jobs/body.py), and the start observer failing closed on what it cannot read."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission
from gateway.config.model import Job, Route, Store
from gateway.jobs.body import MAX_SCANNED, BodyScan, readable_accept_encoding
from gateway.jobs.scan import Scan
from gateway.jobs.table import JobTable
from gateway.jobs.tracker import JobStart, JobTracker
from gateway.metrics import Metrics
from gateway.store import bundle_for
from gateway.store.base import SlotBucket
from gateway.store.memory import MemoryStore

BASE = [(b"host", b"x"), (b"x-api-key", b"k")]


def asked(*values: bytes) -> list[bytes]:
    headers = readable_accept_encoding([*BASE, *((b"accept-encoding", v) for v in values)])
    assert headers[: len(BASE)] == BASE  # everything else as it was
    return [value for name, value in headers if name == b"accept-encoding"]


def test_only_the_codings_the_scan_reads_are_asked_for() -> None:
    assert asked(b"gzip, deflate, br, zstd") == [b"gzip, deflate"]
    assert asked(b"br;q=1.0, GZIP;q=0.5", b"zstd, identity;q=0.1") == [b"GZIP;q=0.5, identity;q=0.1"]
    assert asked(b"zstd") == [b"identity"]
    assert asked(b"*") == [b"identity"]
    assert asked() == [b"identity"]  # no header: any coding would do; ask for one that reads
    assert asked(b"br, gzip;q=0") == [b"identity"]  # nothing accepted is left
    assert asked(b"x-gzip, deflate;q=0") == [b"x-gzip, deflate;q=0"]


DOC = json.dumps({"pad": "x" * 200_000, "status": "completed"}).encode()


@pytest.mark.parametrize("coding, body", [(None, DOC), ("gzip", gzip.compress(DOC)), ("deflate", zlib.compress(DOC))])
def test_gzip_and_deflate_are_decoded_for_the_scan_in_any_chunks(coding: str | None, body: bytes) -> None:
    scan = BodyScan("status", coding)
    for start in range(0, len(body), 777):
        scan.feed(body[start : start + 777])
    assert (scan.finish(), scan.scan.value) == (Scan.FOUND, "completed")


def test_other_codings_broken_streams_and_bombs_are_unreadable() -> None:
    for coding in ("br", "zstd", "gzip, br"):
        assert BodyScan("id", coding).done and BodyScan("id", coding).finish() is Scan.UNREADABLE
    broken = BodyScan("id", "gzip")
    assert broken.feed(b"not gzip at all") and broken.finish() is Scan.UNREADABLE
    bomb = zlib.compress(b"[" + b" " * (MAX_SCANNED + 1000) + b'{"id": 1}]', 9)
    scan = BodyScan("0.id", "deflate")
    for start in range(0, len(bomb), 65_536):
        scan.feed(bomb[start : start + 65_536])
    assert scan.finish() is Scan.UNREADABLE


CRAWLS = SlotBucket("gw:{k:1}:c:crawls", 1)
JOB = Job("crawls", "id", "/crawl/{id}", "status", ("completed",), 3600.0)
ROUTE = Route("/crawl", frozenset({"POST"}), (), job=JOB)
PLAN = AdmissionPlan("p", (), (), (CRAWLS,), (BucketInfo("crawls", 1, 0.0),), 0.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def start_job(store: MemoryStore, headers: list[tuple[bytes, bytes]], body: bytes) -> list[str]:
    """One job start answered 201 with `body`; the ids of the jobs holding a slot after it."""
    tracker = JobTracker(bundle_for(store, Store(prefix="gw", on_error="deny")).job_stores())
    admission = Admission(store, on_error="deny", metrics=Metrics())
    ticket = await admission.admit(PLAN)
    assert ticket.admitted
    observer = tracker.observer(JobTable([ROUTE]), "alice", ROUTE, "POST", "/crawl", PLAN, ticket)
    assert isinstance(observer, JobStart)
    if await observer.head(201, headers):
        await observer.chunk(body)
        await observer.end()
    admission.release(PLAN, ticket)
    usage = await store.usage([], [CRAWLS])
    return [job.job_id for job in usage.jobs[0]]


@pytest.mark.anyio
@pytest.mark.parametrize("headers, body", [
    ([(b"content-encoding", b"br")], b"\x1b\x00"),
    ([], b"<html>accepted</html>"),
    ([], b'{"id": "cut sh'),
    ([], json.dumps({"id": "x" * 201}).encode()),
    ([], b'{"id": {"job": 1}}'),
])  # fmt: skip
async def test_a_start_answer_whose_id_cannot_be_read_holds_the_slot(
    headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    store = MemoryStore(30.0)
    [held] = await start_job(store, headers, body)
    assert held.startswith("unread-")


@pytest.mark.anyio
@pytest.mark.parametrize("body", [b"", b'{"status": "queued"}', b'{"id": null}', b'{"id": ""}'])
async def test_a_start_answer_that_says_there_is_no_job_frees_the_slot(body: bytes) -> None:
    assert await start_job(MemoryStore(30.0), [], body) == []


@pytest.mark.anyio
async def test_the_id_after_a_large_prefix_is_read() -> None:
    body = json.dumps({"invalidURLs": ["u" * 100] * 2000, "id": "late"}).encode()
    assert await start_job(MemoryStore(30.0), [], body) == ["late"]


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "headers", "body", "settled_at"), [
    (500, [], b'{"error": "busy"}', "head"),
    (201, [(b"content-encoding", b"br")], b"", "head"),
    (201, [], b'{"id": "j-1", "rest": "' + b"x" * 1000 + b'"}', "chunk"),
])  # fmt: skip
async def test_a_start_is_settled_as_soon_as_nothing_more_of_its_answer_matters(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, settled_at: str
) -> None:
    """What a start whose client left reads on for (`outlives_client`): once settled, the
    forwarder stops reading. A non-2xx answer settles at its head; before, it never settled,
    and a client leaving during a long error body had the gateway read all of it to nowhere."""
    store = MemoryStore(30.0)
    tracker = JobTracker(bundle_for(store, Store(prefix="gw", on_error="deny")).job_stores())
    admission = Admission(store, on_error="deny", metrics=Metrics())
    ticket = await admission.admit(PLAN)
    observer = tracker.observer(JobTable([ROUTE]), "alice", ROUTE, "POST", "/crawl", PLAN, ticket)
    assert isinstance(observer, JobStart) and observer.outlives_client and not observer.settled
    shown = await observer.head(status, headers)
    assert observer.settled is (settled_at == "head")
    if shown:
        await observer.chunk(body)
        assert observer.settled
    admission.release(PLAN, ticket)
