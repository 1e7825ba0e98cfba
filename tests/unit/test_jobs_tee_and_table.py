"""The pure parts of async jobs: the bounded JSON tee, dotted lookups, status paths and the
buckets a job holds."""

from __future__ import annotations

import gzip
import json
import zlib

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.config.model import Job, Route
from gateway.jobs.table import JobTable, job_slots
from gateway.jobs.tee import JsonTee, lookup
from gateway.store.base import SlotBucket

DOC = {"data": {"id": "job-7", "items": [{"id": 1}, {"id": 2}]}, "status": "queued"}
BODY = json.dumps(DOC).encode()


def test_the_document_is_known_with_the_chunk_that_completes_it() -> None:
    tee = JsonTee()
    chunks = [BODY[:10], BODY[10:-1], BODY[-1:]]
    assert [tee.feed(chunk) for chunk in chunks] == [False, False, True]
    assert tee.document == DOC
    assert tee.finish() == DOC


def test_a_closing_bracket_inside_the_body_is_not_mistaken_for_its_end() -> None:
    tee = JsonTee()
    assert not tee.feed(b'{"a": {"b": 1}')  # looks closed, is not
    assert tee.feed(b"}\n")
    assert tee.document == {"a": {"b": 1}}


def test_gzip_and_deflate_bodies_are_decoded_for_the_tee_only() -> None:
    for encoding, data in (("gzip", gzip.compress(BODY)), ("deflate", zlib.compress(BODY))):
        tee = JsonTee(encoding)
        for start in range(0, len(data), 7):
            tee.feed(data[start : start + 7])
        assert tee.document == DOC, encoding


def test_what_cannot_be_read_gives_no_document() -> None:
    unknown = JsonTee("br")
    assert not unknown.feed(BODY) and unknown.finish() is None
    big = JsonTee(limit=100)
    assert not big.feed(b'{"pad": "' + b"x" * 200 + b'"}')
    assert big.finish() is None
    broken = JsonTee()
    assert not broken.feed(b'{"id": ') and broken.finish() is None
    bomb = JsonTee("gzip", limit=1000)
    bomb.feed(gzip.compress(b'{"a": "' + b"0" * 100_000 + b'"}'))
    assert bomb.finish() is None


def test_dotted_lookup() -> None:
    assert lookup(DOC, "data.id") == "job-7"
    assert lookup(DOC, "data.items.1.id") == 2
    assert lookup(DOC, "status") == "queued"
    for missing in ("data.nope", "data.items.9.id", "status.deeper", "data.items.x"):
        assert lookup(DOC, missing) is None
    assert lookup(["a"], "0") == "a"


def _job(status_path: str = "/v1/crawl/{id}") -> Job:
    return Job("crawls", "id", status_path, "status", ("completed",), 60.0)


def test_status_paths_name_the_job_for_get_and_delete_only() -> None:
    table = JobTable([Route("/v1/crawl", frozenset({"POST"}), (), job=_job()),
                      Route("/v1/batch", None, (), job=_job("/v1/batch/{id}/status")),
                      Route("/v1/**", None, ())])
    assert not table.empty
    found = table.status_request("GET", "/v1/crawl/abc")
    assert found is not None and (found.job_id, found.cancel) == ("abc", False)
    cancel = table.status_request("DELETE", "/v1/crawl/abc")
    assert cancel is not None and cancel.cancel
    batch = table.status_request("GET", "/v1/batch/b-1/status")
    assert batch is not None and batch.job_id == "b-1"
    assert table.status_request("POST", "/v1/crawl/abc") is None
    assert table.status_request("GET", "/v1/crawl/abc/more") is None
    assert table.status_request("GET", "/v1/crawl/") is None
    assert JobTable([Route("/x", None, ())]).empty


def test_a_job_holds_its_limits_buckets_only() -> None:
    slots = (SlotBucket("gw:{w:1}:c:requests", 5), SlotBucket("gw:{w:1}:w:c:crawls", 10),
             SlotBucket("gw:{w:1}:k:2:c:crawls", 2))
    infos = (BucketInfo("requests", 5, 0), BucketInfo("crawls", 10, 0), BucketInfo("crawls.key", 2, 0))
    plan = AdmissionPlan("p", (), (), slots, infos, 0.0)
    assert job_slots(plan, _job()) == slots[1:]
    assert job_slots(plan, Job("other", "id", "/x/{id}", "status", ("done",), 1.0)) == ()
