"""Job slots on the request path: the observers the forwarder calls while a response streams.

`JobStart` watches the answer to a job route: on a 2xx JSON body with an id at the job's
dotted path, the request's slot in the job's limit passes to the job (store `hand_over`)
before the chunk that completes the document is sent, so the client cannot learn the id
before the job holds the slot (a status request on another replica then finds it). A non-2xx
answer, or a 2xx without an id, hands nothing over: the request's `finally` frees the slot.

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
from gateway.jobs.table import JobTable, StatusRequest, job_slots
from gateway.jobs.tee import JsonTee, lookup
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
    __slots__ = ("_store", "_slots", "_lease_id", "_owner", "_job", "_tee", "_claimed")

    def __init__(
        self, store: JobStore, slots: tuple[SlotBucket, ...], lease_id: str, owner: str, job: Job
    ) -> None:
        self._store = store
        self._slots = slots
        self._lease_id = lease_id
        self._owner = owner
        self._job = job
        self._tee: JsonTee | None = None
        self._claimed = False

    async def head(self, status: int, headers: Headers) -> bool:
        if not 200 <= status < 300:
            return False  # the request's release frees the slot at once
        self._tee = JsonTee(_encoding(headers))
        return True

    async def chunk(self, data: bytes) -> None:
        if self._tee is not None and not self._claimed and self._tee.feed(data):
            await self._claim(self._tee.document)

    async def end(self) -> None:
        if self._tee is not None and not self._claimed:
            await self._claim(self._tee.finish())

    async def _claim(self, document: Any) -> None:
        self._claimed = True
        job_id = valid_job_id(lookup(document, self._job.id_path)) if document is not None else None
        if job_id is None:
            log.info("job route answered 2xx without a job id at %r: slot freed", self._job.id_path)
            return
        claim = JobClaim(job_id, self._owner, self._job.max_duration)
        try:
            held = await _shielded(self._store.hand_over(self._slots, self._lease_id, claim))
        except StoreError as exc:
            log.warning("job %s: handover to the store failed, its slot is freed: %s", job_id, exc)
            return
        if not held:
            log.info("job %s ended (or lost its slot) before the handover: slot freed", job_id)


class JobReport:
    __slots__ = ("_tracker", "_status", "_owner", "_tee", "_acted")

    def __init__(self, tracker: JobTracker, status: StatusRequest, owner: str) -> None:
        self._tracker = tracker
        self._status = status
        self._owner = owner
        self._tee: JsonTee | None = None
        self._acted = False

    async def head(self, status: int, headers: Headers) -> bool:
        if not 200 <= status < 300:
            return False
        if self._status.cancel:
            await self._end()
            return False
        self._tee = JsonTee(_encoding(headers))
        return True

    async def chunk(self, data: bytes) -> None:
        if self._tee is not None and not self._acted and self._tee.feed(data):
            await self._check(self._tee.document)

    async def end(self) -> None:
        if self._tee is not None and not self._acted:
            await self._check(self._tee.finish())

    async def _check(self, document: Any) -> None:
        self._acted = True
        job = self._status.job
        value = lookup(document, job.status_field) if document is not None else None
        if isinstance(value, str) and value in job.done:
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
