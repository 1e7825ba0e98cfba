"""Which requests touch a job, compiled once per config. Pure.

- A request on a route with `job` may start a job: its slot in the job's limit passes to the
  job when the upstream answers 2xx with an id.
- A GET or DELETE whose path matches a job route's `status_path` reports on (or cancels) the
  job whose id is the `{id}` segment, whatever route it is admitted on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.admission.buckets import AdmissionPlan
from gateway.config.model import Job, Route
from gateway.store.base import SlotBucket

STATUS_METHODS = frozenset({"GET", "DELETE"})


@dataclass(frozen=True, slots=True)
class StatusRequest:
    job: Job
    job_id: str
    cancel: bool  # DELETE: a 2xx answer ends the job


def _status_regex(template: str) -> re.Pattern[str]:
    parts = []
    for segment in template.split("/"):
        if "{id}" in segment:  # the whole segment, or with literal text around (`{id}.json`)
            before, _, after = segment.partition("{id}")
            parts.append(re.escape(before) + "(?P<id>[^/]+)" + re.escape(after))
        elif segment.startswith("{") and segment.endswith("}"):
            parts.append("[^/]+")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


class JobTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        seen: set[str] = set()
        self._status: list[tuple[re.Pattern[str], Job]] = []
        for route in routes:
            job = route.job
            if job is not None and job.status_path not in seen:
                seen.add(job.status_path)
                self._status.append((_status_regex(job.status_path), job))

    @property
    def empty(self) -> bool:
        return not self._status

    def status_request(self, method: str, path: str) -> StatusRequest | None:
        """The job a GET / DELETE of `path` is about, if any (first status_path that matches)."""
        if method not in STATUS_METHODS:
            return None
        for regex, job in self._status:
            match = regex.fullmatch(path)
            if match is not None:
                return StatusRequest(job, match.group("id"), method == "DELETE")
        return None


def job_slots(plan: AdmissionPlan, job: Job) -> tuple[SlotBucket, ...]:
    """The slot buckets of `plan` that the job holds: its limit's bucket (and, for a
    workspace-scoped limit with a key override, the key's own cap inside it)."""
    names = (job.limit, f"{job.limit}.key")
    pairs = zip(plan.slots, plan.slot_info, strict=True)
    return tuple(bucket for bucket, info in pairs if info.policy in names)
