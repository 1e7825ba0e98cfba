"""The pure parts of async jobs: dotted lookups (the reference reading), status paths and the
buckets a job holds. (The streaming scan that reads answers: test_jobs_scan.py.)"""

from __future__ import annotations

import json

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.config.model import Job, Route
from gateway.jobs.table import JobTable, job_slots
from gateway.store.base import SlotBucket
from tests.support.dotted import lookup

DOC = {"data": {"id": "job-7", "items": [{"id": 1}, {"id": 2}]}, "status": "queued"}
BODY = json.dumps(DOC).encode()


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


def test_an_id_inside_a_segment_is_found_with_the_text_around_it() -> None:
    """`/v1/crawl/{id}.json` passed the loader and never matched: every job held its slot for
    `max_duration`."""
    table = JobTable([Route("/v1/crawl", frozenset({"POST"}), (), job=_job("/v1/crawl/{id}.json")),
                      Route("/v1/batch", frozenset({"POST"}), (), job=_job("/v1/batch/job-{id}/x"))])
    found = table.status_request("GET", "/v1/crawl/job-1.json")
    assert found is not None and found.job_id == "job-1"
    cancel = table.status_request("DELETE", "/v1/batch/job-b.7/x")
    assert cancel is not None and (cancel.job_id, cancel.cancel) == ("b.7", True)
    assert table.status_request("GET", "/v1/crawl/job-1") is None
    assert table.status_request("GET", "/v1/crawl/.json") is None
    assert table.status_request("GET", "/v1/batch/b-1/x") is None


def test_a_job_holds_its_limits_buckets_only() -> None:
    slots = (SlotBucket("gw:{w:1}:c:requests", 5), SlotBucket("gw:{w:1}:w:c:crawls", 10),
             SlotBucket("gw:{w:1}:k:2:c:crawls", 2))
    infos = (BucketInfo("requests", 5, 0), BucketInfo("crawls", 10, 0), BucketInfo("crawls.key", 2, 0))
    plan = AdmissionPlan("p", (), (), slots, infos, 0.0)
    assert job_slots(plan, _job()) == slots[1:]
    assert job_slots(plan, Job("other", "id", "/x/{id}", "status", ("done",), 1.0)) == ()
