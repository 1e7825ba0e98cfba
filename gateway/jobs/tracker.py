"""Job slots on the request path: the observers the forwarder calls while a response streams.

Both ask the upstream for an answer they can read (gateway/jobs/body.py: the forwarded
`Accept-Encoding` keeps gzip, deflate and identity only) and scan its JSON as it streams,
for one field, however large the body (gateway/jobs/scan.py).

`JobStart` watches the answer to a job route: on a 2xx answer whose id is at the job's dotted
path, the request's slot in the job's limit passes to the job (store `hand_over`) before the
chunk that completes the id is sent, so the client cannot learn the id before the job holds the
slot (a status request on another replica then finds it). A non-2xx answer, or a 2xx that
reads in full with nothing at the path (missing, null, "", no body), hands nothing over: the
request's `finally` frees the slot. A 2xx whose id cannot be read (another coding, not JSON,
cut short, an id that cannot be one) fails closed: the slot is held as a job under a
synthetic id (`unread-<lease>`, logged) until `max_duration` or the admin `done` call, since
the upstream may be running a job the client knows the id of.

`JobReport` watches a GET or DELETE of a job's status path: a 2xx DELETE, or a 2xx GET whose
`status_field` is one of `done`, ends the job for the calling key only (a job id seen for
another key is not theirs to end), before the answer reaches the client.

A request of K slots (its cost rule's `slots`) hands all K to the job: the count rides in the
lease id, so the store moves every member. Its units stay with the request: the request's own
release, after the handover, still carries its settlement (gateway/admission/controller.py).

Store calls made here are shielded: a client that disconnects mid-call cannot leave a
handover half done. A store failure is logged and counted; the slot then heals by itself
(the lease expires, or the job member at `max_duration`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from gateway.admission.buckets import AdmissionPlan
from gateway.admission.controller import Ticket
from gateway.config.model import Job, Route
from gateway.jobs.body import BodyScan, readable_accept_encoding
from gateway.jobs.scan import FieldScan, Scan
from gateway.jobs.table import JobTable, StatusRequest, job_slots
from gateway.proxy.upstream import Headers
from gateway.store.base import AdmissionStore, SlotBucket, StoreError
from gateway.store.jobs import EndedJob, JobClaim, JobStore, valid_job_id

log = logging.getLogger("gateway.jobs")
T = TypeVar("T")


def _encoding(headers: Headers) -> str | None:
    for name, value in headers:
        if name.lower() == b"content-encoding":
            return value.decode("latin-1")
    return None


async def _shielded(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run to the end even if the caller is cancelled (its result is then dropped)."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "unretrieved"
    return await asyncio.shield(task)


class JobStart:
    __slots__ = ("_store", "_slots", "_lease_id", "_owner", "_job", "_scan", "_claimed")

    # A client that leaves once the start went upstream does not stop its reading: the upstream
    # may start the job anyway (and tell the client its id by webhook); its slot follows it.
    outlives_client = True

    def __init__(
        self, store: JobStore, slots: tuple[SlotBucket, ...], lease_id: str, owner: str, job: Job
    ) -> None:
        self._store = store
        self._slots = slots
        self._lease_id = lease_id
        self._owner = owner
        self._job = job
        self._scan: BodyScan | None = None
        self._claimed = False

    @property
    def settled(self) -> bool:
        return self._claimed

    def upstream_headers(self, headers: Headers) -> Headers:
        return readable_accept_encoding(headers)

    async def head(self, status: int, headers: Headers) -> bool:
        if not 200 <= status < 300:
            self._claimed = True  # settled: no job (the request's release frees the slot at once)
            return False
        self._scan = BodyScan(self._job.id_path, _encoding(headers))
        if self._scan.done:  # a coding it cannot read: held before the client gets anything
            await self._claim(self._scan.scan)
            return False
        return True

    async def chunk(self, data: bytes) -> None:
        if self._scan is not None and not self._claimed and self._scan.feed(data):
            await self._claim(self._scan.scan)

    async def end(self) -> None:
        if self._scan is not None and not self._claimed:
            self._scan.finish()
            await self._claim(self._scan.scan)

    async def _claim(self, scan: FieldScan) -> None:
        self._claimed = True
        job_id = _job_id(scan)
        if job_id is None:
            log.info("job route answered 2xx without a job id at %r: slot freed", self._job.id_path)
            return
        if job_id is _UNREADABLE:
            job_id = unread_job_id(self._lease_id)
            log.warning(
                "job route answered 2xx and its job id at %r cannot be read (%s): the slot is held as "
                "job %s until max_duration or POST /v1/jobs/%s/done",
                self._job.id_path, _why(scan), job_id, job_id,
            )  # fmt: skip
        claim = JobClaim(job_id, self._owner, self._job.max_duration)
        try:
            held = await _shielded(self._store.hand_over(self._slots, self._lease_id, claim))
        except StoreError as exc:
            log.warning("job %s: handover to the store failed, its slot is freed: %s", job_id, exc)
            return
        if not held:
            log.info("job %s ended (or lost its slot) before the handover: slot freed", job_id)


_UNREADABLE = "\0unreadable"  # never a job id (valid_job_id refuses control characters)


def _job_id(scan: FieldScan) -> str | None:
    """The job id a start answer gives; None when it says there is none (no value at the path,
    null, "", or no body); _UNREADABLE when there may be one the gateway cannot see (fail
    closed: the client chose neither the coding nor the size of what hides it)."""
    if scan.state in (Scan.ABSENT, Scan.EMPTY):
        return None
    if scan.state is Scan.FOUND:
        if scan.value is None or scan.value == "":
            return None
        return valid_job_id(scan.value) or _UNREADABLE
    return _UNREADABLE


def _why(scan: FieldScan) -> str:
    if scan.state is Scan.FOUND:
        return "not an id: over 200 characters, control characters, or not a string or integer"
    return "not JSON, another Content-Encoding than gzip/deflate, cut short, or over 64 MiB"


def unread_job_id(lease_id: str) -> str:
    """The id a job is held under when its own cannot be read: unique per request."""
    return "unread-" + lease_id.partition("*")[0]


class JobReport:
    __slots__ = ("_tracker", "_status", "_owner", "_scan", "_acted")

    outlives_client = False  # a status the client did not wait for ends nothing (it polls again)

    def __init__(self, tracker: JobTracker, status: StatusRequest, owner: str) -> None:
        self._tracker = tracker
        self._status = status
        self._owner = owner
        self._scan: BodyScan | None = None
        self._acted = False

    @property
    def settled(self) -> bool:
        return self._acted

    def upstream_headers(self, headers: Headers) -> Headers:
        return readable_accept_encoding(headers)

    async def head(self, status: int, headers: Headers) -> bool:
        if not 200 <= status < 300:
            return False
        if self._status.cancel:
            await self._end()
            return False
        self._scan = BodyScan(self._status.job.status_field, _encoding(headers))
        if self._scan.done:
            await self._check(self._scan.scan)
            return False
        return True

    async def chunk(self, data: bytes) -> None:
        if self._scan is not None and not self._acted and self._scan.feed(data):
            await self._check(self._scan.scan)

    async def end(self) -> None:
        if self._scan is not None and not self._acted:
            self._scan.finish()
            await self._check(self._scan.scan)

    async def _check(self, scan: FieldScan) -> None:
        self._acted = True
        job = self._status.job
        if scan.state is Scan.UNREADABLE:
            log.info("job %s: its status answer cannot be read; it ends by DELETE, the admin call or "
                     "max_duration", self._status.job_id)
        elif scan.state is Scan.FOUND and isinstance(scan.value, str) and scan.value in job.done:
            await self._end()

    async def _end(self) -> None:
        self._acted = True
        try:
            await _shielded(self._tracker.end(self._status.job_id, self._owner))
        except StoreError as exc:
            log.warning("job %s: ending it in the store failed: %s", self._status.job_id, exc)


class JobTracker:
    """Per process: the job store of each admission store, and the observers of a request."""

    def __init__(self, stores: Iterable[tuple[AdmissionStore, JobStore]]) -> None:
        # (admission store, its job store), the shared store first: `StoreBundle.job_stores()`.
        self._stores = list(stores)

    def job_store(self, store: AdmissionStore) -> JobStore | None:
        for admission_store, jobs in self._stores:
            if admission_store is store:
                return jobs
        return None

    def observer(
        self,
        table: JobTable,
        owner: str,
        route: Route,
        method: str,
        path: str,
        plan: AdmissionPlan,
        ticket: Ticket,
    ) -> JobStart | JobReport | None:
        """What to watch in this request's answer, if anything (None for most requests)."""
        status = None if table.empty else table.status_request(method, path)
        if status is not None:
            return JobReport(self, status, owner)
        job = route.job
        if job is None or ticket.store is None:
            return None
        slots = job_slots(plan, job)
        jobs = self.job_store(ticket.store)
        if not slots or jobs is None:
            return None
        return JobStart(jobs, slots, ticket.lease_id, owner, job)

    async def end(self, job_id: str, owner: str | None) -> EndedJob | None:
        """End a job wherever it is held (the store, or the local fallback store). Raises
        StoreError when the shared store could not be asked and no other store held the job:
        "not found" would then be a guess (the job may hold its slot in the shared store), and
        the caller must be told to retry (admin `done`: 503, not a 404 to ignore)."""
        failure: StoreError | None = None
        for _, jobs in self._stores:
            try:
                ended = await jobs.end(job_id, owner)
            except StoreError as exc:
                log.warning("ending job %s failed: %s", job_id, exc)
                failure = exc
                continue
            if ended is not None:
                return ended
        if failure is not None:
            raise failure
        return None

    @property
    def primary(self) -> JobStore | None:
        """The job store of the admission store (for the admin view)."""
        return self._stores[0][1] if self._stores else None
