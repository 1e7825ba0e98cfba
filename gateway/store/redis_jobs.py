"""Redis job store: job_index.lua, job_handover.lua, job_free.lua, job_drop.lua and usage.lua
over the admission store's connection (`RedisStore.run_script`: same pool, budget, NOSCRIPT
reload).

Key names (Redis Cluster: slot buckets keep the key's hash tag; a job's index and tombstone
have the job's own tag, so they are found from the job id alone; no script mixes the two):

    {prefix}:{j:<h(job id)>}:job    hash job / owner / member / keys / ended (job_index.lua)
    {prefix}:{j:<h(job id)>}:jend   set of owners whose end found no index yet (job_free.lua)
    <key's tag>:jdone               sorted set: members of jobs that ended (job_drop.lua)

Two hash tags cannot change in one script, so every step is ordered and idempotent by job id,
and a call that failed (timed out, or its connection dropped before the reply: it may or may
not have run, and may still land late) is sent once more:

- handover: the index first (job tag), then the slot (key tag). A member is therefore never
  in a bucket without an index that finds it. If the slot step still fails, the member is
  dropped again by id (job_drop.lua, which also stops a late handover from landing) and the
  request's own release frees its lease: "not handed over" never leaves a slot behind.
- end: the index is marked ended (job tag), then the member dropped (key tag), waiters woken.
  If the drop fails, the next end of the same job (a status poll, the admin call repeated)
  finds the ended index and drops it again; `max_duration` bounds it in any case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from gateway.store import scripts, window_counter
from gateway.store.base import QuotaBucket, RateBucket, SlotBucket, StoreError, StoreObserver, lease_members
from gateway.store.jobs import (
    INDEX_SLACK_SECONDS,
    TOMBSTONE_SECONDS,
    ActiveJob,
    EndedJob,
    JobClaim,
    Usage,
    job_id_of,
    job_member,
)
from gateway.store.names import short_hash
from gateway.store.redis import RedisStore

log = logging.getLogger(__name__)

OPERATION = "jobs"


class RedisJobStore:
    def __init__(self, store: RedisStore, *, prefix: str, observer: StoreObserver | None = None) -> None:
        self._store = store
        self._prefix = prefix
        self._observer = observer
        self._handover = scripts.load("job_handover")
        self._index = scripts.load("job_index")
        self._free = scripts.load("job_free")
        self._drop_script = scripts.load("job_drop")
        self._usage = scripts.load("usage")

    def _job_keys(self, job_id: str) -> list[str]:
        tag = f"{self._prefix}:{{j:{short_hash(job_id)}}}"
        return [f"{tag}:job", f"{tag}:jend"]

    async def _run(self, script: scripts.Script, keys: list[str], args: list[str | int]) -> object:
        """One idempotent job script, sent a second time if the first call failed."""
        try:
            return await self._run_once(script, keys, args)
        except StoreError as exc:
            log.info("%s failed, sending it once more (it is idempotent): %s", script.name, exc)
        return await self._run_once(script, keys, args)

    async def _run_once(self, script: scripts.Script, keys: list[str], args: list[str | int]) -> object:
        try:
            (reply,) = await self._store.run_script(script, [(keys, args)])
            if isinstance(reply, BaseException):
                raise StoreError(f"{script.name} failed: {reply!r}") from reply
        except StoreError:
            if self._observer is not None:
                self._observer.store_error(OPERATION)
            raise
        return reply

    async def _drop(self, slot_keys: list[str], member: str) -> None:
        """The member leaves `slot_keys` and is remembered as ended there; waiters are woken."""
        await self._run(self._drop_script, [*slot_keys, ended_set_key(slot_keys[0])],
                        [member, scripts.ms_arg(TOMBSTONE_SECONDS), self._store.now_arg()])
        slots = [SlotBucket(key, 0) for key in slot_keys]
        self._store.release(slots, member, wake=True)  # the wake-up (its ZREM finds nothing)
        await self._store.flush()

    async def hand_over(self, slots: Sequence[SlotBucket], lease_id: str, claim: JobClaim) -> bool:
        if not slots:
            return False
        self._store.forget_leases(slots, lease_id)  # the heartbeat must not renew (or miss) it
        member = job_member(claim.job_id, len(lease_members(lease_id)))
        keys = [slot.key for slot in slots]
        ended = await self._run(
            self._index, self._job_keys(claim.job_id),
            [claim.job_id, claim.owner, member, "\n".join(keys),
             scripts.ms_arg(claim.max_duration + INDEX_SLACK_SECONDS)],
        )  # fmt: skip
        if ended:
            return False
        try:
            moved = await self._run(
                self._handover, [*keys, ended_set_key(keys[0])],
                [lease_id, member, scripts.ms_arg(claim.max_duration), scripts.ms_arg(self._store.lease),
                 self._store.now_arg()],
            )  # fmt: skip
        except StoreError:
            # It may have run, or may still land: undo it by id, so the slot is freed with
            # the request's lease either way.
            await self._drop(keys, member)
            await self._retire_index(claim)
            raise
        if moved:
            return True
        # The lease was gone: a definite answer (no other run of this handover can find it).
        await self._retire_index(claim)
        return False

    async def _retire_index(self, claim: JobClaim) -> None:
        """Mark the index of a job that holds no slot ended, so a later end of its id reports
        nothing held. Best effort: a stale index names a member no bucket holds."""
        try:
            await self._run(self._free, self._job_keys(claim.job_id),
                            [claim.job_id, claim.owner, scripts.ms_arg(TOMBSTONE_SECONDS), "handover"])
        except StoreError as exc:
            log.info("job %s: marking its unused index ended failed: %s", claim.job_id, exc)

    async def end(self, job_id: str, owner: str | None) -> EndedJob | None:
        end_id = os.urandom(8).hex()
        reply = await self._run(
            self._free, self._job_keys(job_id),
            [job_id, owner or "", scripts.ms_arg(TOMBSTONE_SECONDS), end_id],
        )  # fmt: skip
        if not isinstance(reply, list) or len(reply) != 4 or int(reply[0]) not in (1, 2):
            return None
        held_by, member, keys = (_text(value) for value in reply[1:])
        slot_keys = [key for key in keys.split("\n") if key]
        if slot_keys:
            await self._drop(slot_keys, member)  # also after an earlier end: heals a failed drop
        return EndedJob(job_id, held_by) if int(reply[0]) == 1 else None

    async def usage(
        self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], quotas: Sequence[QuotaBucket] = ()
    ) -> Usage:
        keys = [rate.key for rate in rates] + [slot.key for slot in slots] + [quota.key for quota in quotas]
        if not keys:
            return Usage([], [], [], [])
        args: list[str | int] = [self._store.now_arg(), len(rates), len(quotas),
                                 *(rate.window_ms for rate in rates), *(quota.period for quota in quotas)]
        reply = await self._run(self._usage, keys, args)
        return decode_usage(reply, rates, len(slots), len(quotas))


def ended_set_key(slot_key: str) -> str:
    """The sorted set of ended job members beside a key's slot buckets (same hash tag)."""
    tag = scripts.hash_tag(slot_key)
    start = slot_key.find("{" + tag + "}")
    if start < 0:
        return f"{slot_key}:jdone"
    return f"{slot_key[: start + len(tag) + 2]}:jdone"


def decode_usage(reply: object, rates: Sequence[RateBucket], n_slot: int, n_quota: int = 0) -> Usage:
    n_rate = len(rates)
    if not isinstance(reply, list) or len(reply) < 1 + 5 * n_rate + 2 * n_slot + 3 * n_quota:
        raise StoreError(f"malformed usage reply: {reply!r:.200}")
    try:
        now = float(_text(reply[0]))
        rate_counts = [_rate_count(rate, reply[1 + 5 * i : 6 + 5 * i], now) for i, rate in enumerate(rates)]
    except (TypeError, ValueError) as exc:
        raise StoreError(f"malformed usage reply: {reply!r:.200}") from exc
    slot_counts: list[int] = []
    jobs: list[list[ActiveJob]] = []
    at = 1 + 5 * n_rate
    for _ in range(n_slot):
        slot_counts.append(int(reply[at]))
        n_jobs = int(reply[at + 1])
        at += 2
        bucket_jobs = []
        for _ in range(n_jobs):
            member, left = _text(reply[at]), int(reply[at + 1])
            job_id = job_id_of(member)
            if job_id is not None:  # one entry per job, not per slot it holds
                bucket_jobs.append(ActiveJob(job_id, left))
            at += 2
        jobs.append(bucket_jobs)
    quotas = [scripts.decode_quota(reply[at + 3 * q : at + 3 * q + 3]) for q in range(n_quota)]
    if at + 3 * n_quota != len(reply):
        raise StoreError(f"malformed usage reply: {reply!r:.200}")
    return Usage(rate_counts, slot_counts, jobs, quotas)


def _rate_count(rate: RateBucket, values: list[object], now: float) -> int:
    """A log's count as usage.lua counted it, or a counter's estimate rounded up (as admit.lua
    reports it) from its stored state."""
    kind, *numbers = (int(float(_text(value))) for value in values)
    if kind == 0:
        return numbers[0]
    window, count, previous, window_ms = numbers
    state = window_counter.CounterState(window, count, previous, window_ms)
    return window_counter.whole_count(window_counter.seen_at(state, now, rate.window_ms), now)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
