"""The job store seam: concurrency slots held by async jobs rather than by requests.

Semantics both implementations keep (tests/store/test_jobs_contract.py checks them):

- `hand_over` replaces an admitted request's lease by the job's member in the job's slot
  buckets, atomically per bucket: the slot is never free in between. The member expires
  `max_duration` after the handover unless the job ends first; the heartbeat never renews
  it. An index job id -> (owner key id, buckets) lets the job be ended by id alone. False
  when nothing was handed over (the lease was already gone) or when the job had already
  ended before the handover landed (an end reported first leaves a short-lived tombstone):
  the slot is then free.
- `end` ends a job by id: its member leaves its buckets and the waiters of those buckets are
  woken. `owner` must be the key that holds the job (status requests), or None (the admin
  call from the upstream). Idempotent; returns who held it, or None when unknown (or held
  by another key: a job id seen for another key is not theirs to end).
- Both are idempotent by job id: a handover sent again (a retry after a lost reply, or one
  landing late) answers what the first did and changes nothing; it moves nothing once the job
  ended. An end sent again reports None. On Redis a job call that failed is sent once more,
  and a handover that still fails is undone by id (gateway/store/redis_jobs.py).
- `usage` reads, without writing, how full each bucket is now and which jobs hold slots.

Job members are "j:" + job id; ids are at most MAX_JOB_ID characters, no control chars.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.store.base import QuotaBucket, QuotaUsage, RateBucket, SlotBucket, lease_members

MAX_JOB_ID = 200
JOB_MEMBER_PREFIX = "j:"
# How long an end reported for a job nobody holds (yet) is remembered: covers a handover
# still on its way, never a slot for long.
TOMBSTONE_SECONDS = 600.0
# The index outlives the member a little, so a late end still finds who held it.
INDEX_SLACK_SECONDS = 60.0


def job_member(job_id: str, slots: int = 1) -> str:
    """The job's lease in its slot buckets: `j:<id>`, weighted like a request's lease
    (base.weighted_lease) when it holds several slots, or when the id itself ends in `*<digits>`
    (so base.lease_members always finds exactly `slots` members)."""
    member = JOB_MEMBER_PREFIX + job_id
    if slots > 1 or _weighted(member):
        return f"{member}*{slots}"
    return member


def job_id_of(member: str) -> str | None:
    """The job id of a job lease's first member; None for its other members (`...*K#n`)."""
    head, hash_, number = member.rpartition("#")
    if hash_ and number.isascii() and number.isdigit() and member in lease_members(head):
        return None
    job_id = member[len(JOB_MEMBER_PREFIX) :]
    return job_id.rpartition("*")[0] if _weighted(job_id) else job_id


def _weighted(text: str) -> bool:
    _, star, count = text.rpartition("*")
    return bool(star) and count.isascii() and count.isdigit()


def valid_job_id(value: object) -> str | None:
    """The job id as text, or None when it cannot be one (empty, too long, control chars)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    if not text or len(text) > MAX_JOB_ID or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None
    return text


@dataclass(frozen=True, slots=True)
class JobClaim:
    """What a job route learns from the upstream's 2xx answer."""

    job_id: str
    owner: str  # the key id whose request started it
    max_duration: float  # seconds


@dataclass(frozen=True, slots=True)
class EndedJob:
    job_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class ActiveJob:
    job_id: str
    expires_in_ms: int


@dataclass(frozen=True, slots=True)
class Usage:
    """Parallel to the `rates` / `slots` arguments of `usage`."""

    rate_counts: list[int]
    slot_counts: list[int]  # live members: leases and jobs
    jobs: list[list[ActiveJob]] = field(default_factory=list)
    quotas: list[QuotaUsage] = field(default_factory=list)  # parallel to `quotas`


class JobStore(Protocol):
    async def hand_over(self, slots: Sequence[SlotBucket], lease_id: str, claim: JobClaim) -> bool:
        """Move the lease to the job (see module docstring). Raises StoreError."""

    async def end(self, job_id: str, owner: str | None) -> EndedJob | None:
        """End a job; None when unknown or not `owner`'s. Raises StoreError."""

    async def usage(
        self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], quotas: Sequence[QuotaBucket] = ()
    ) -> Usage:
        """Current counts of one key's buckets (one hash tag), quotas included (used and granted
        in the current period). Raises StoreError."""
