"""In-process admission store (`memory://`): the Redis store's semantics for one process.

Everything runs on one event loop and `admit` never awaits between reading and writing, so
no lock is needed. Times are float milliseconds from the injected clock, like the scores
of the Lua scripts, so both stores take the same decisions at the same instants.

Per call the cost is O(buckets) plus the entries that expired (none are looked for before the
earliest expiry held: a bound that every write lowers and the sweep recomputes). A rate bucket
is a deque of admission times (oldest first), or for `exact: false` a `CounterState` of a few
numbers whatever the limit (gateway/store/window_counter.py); a slot bucket is an
insertion-ordered dict lease id -> expiry, kept in expiry order because every expiry is `now + lease` on a
monotonic clock and a renewal moves the lease to the end. Held leases are renewed by a heartbeat every
lease/3, exactly as the Redis store does, so a loop stalled longer than `lease` loses its
leases here too. The heartbeat also sweeps idle buckets, so memory stays bounded by what
is live: empty buckets are dropped (a slot bucket emptied by a release waits for the sweep,
so the next admission can reuse it).

Costs, quotas, weighted slots, shadow buckets and settlements follow admit.lua and settle.lua
step for step: a log holds one time per unit (and, when it counts cost, lease -> (time, units)
for settlements); a quota is [period index, used, granted, expiry]; a lease of K slots holds K
members. Settled lease ids are remembered two leases (a release sent again applies once).

Job members (slots held by async jobs, with their own expiry) and waiter queues live beside
the leases (gateway/store/memory_jobs.py) and count exactly as admit.lua counts them; wake-ups
are direct (`LocalWakeups`): a release with `wake=True` sets the waiters' events at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.store import periods, scripts, window_counter
from gateway.store.base import (
    ONE,
    AdmitResult,
    Charge,
    NullObserver,
    QueueSpot,
    QuotaBucket,
    QuotaUsage,
    RateBucket,
    Settlement,
    SlotBucket,
    StoreObserver,
    bounded,
    check_charge,
    lease_members,
)
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
from gateway.store.memory_jobs import MemoryJobBook, MemoryQueues
from gateway.store.scripts import hash_tag
from gateway.store.wakeups import LocalWakeups
from gateway.store.window_counter import CounterState


class _Window:
    __slots__ = ("window_ms", "times", "owners")

    def __init__(self, window_ms: float) -> None:
        self.window_ms = window_ms
        self.times: deque[float] = deque()  # one entry per unit
        # Leases of a cost-counting window -> (admission time, units), for settlements.
        self.owners: dict[str, tuple[float, int]] = {}

    def purge(self, now: float) -> None:
        # An admission counts while its time lies in (now - window, now].
        horizon = now - self.window_ms
        times = self.times
        while times and times[0] <= horizon:
            times.popleft()


class MemoryStore:
    release_turns = 0  # in process: a release is done when `release` returns
    failure_domain = None  # one process: one failure domain
    ready_tag = "memory:{ready}"  # the readiness probe's keys (check_ready)

    def __init__(
        self,
        lease: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: StoreObserver | None = None,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self._lease = lease
        self._lease_ms = lease * 1000.0
        self._clock = clock
        self._observer: StoreObserver = observer or NullObserver()
        self._windows: dict[str, _Window] = {}
        self._counters: dict[str, CounterState] = {}  # `exact: false` buckets
        self._slots: dict[str, OrderedDict[str, float]] = {}
        self._held: set[tuple[str, str]] = set()
        # At most the earliest expiry of any lease or job member (math.inf: none held).
        self._earliest_expiry = math.inf
        self._quotas: dict[str, list[Any]] = {}  # key -> [period index, used, granted, expiry ms]
        # Windows and leases run on the clock (monotonic by default: a wall-clock step must not
        # move them); quota periods are UTC calendar periods, so they need the wall time. An
        # injected clock (tests) is taken as wall time itself.
        self._wall_offset_ms = (time.time() - time.monotonic()) * 1000.0 if clock is time.monotonic else 0.0
        self._settled: dict[str, float] = {}  # lease ids settled -> until when remembered
        self._settled_ttl_ms = 2 * self._lease_ms
        self._heartbeat: asyncio.Task[None] | None = None
        self._queues = MemoryQueues()
        self._jobs = MemoryJobBook()
        self._wakeups = LocalWakeups()

    def _now(self) -> float:
        return _round_to_us(self._clock() * 1000.0)

    async def start(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="memory-store-heartbeat")

    async def aclose(self) -> None:
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def admit(
        self,
        rates: Sequence[RateBucket],
        slots: Sequence[SlotBucket],
        lease_id: str,
        queue: QueueSpot | None = None,
        *,
        quotas: Sequence[QuotaBucket] = (),
        charge: Charge = ONE,
    ) -> AdmitResult:
        return self.admit_now(rates, slots, lease_id, queue, quotas=quotas, charge=charge)

    @property
    def synchronous_admit(self) -> Callable[..., AdmitResult] | None:
        """`admit_now` for a caller that can spare the coroutine (the admission controller);
        None when a subclass redefines `admit`, so that its `admit` is the one called."""
        return self.admit_now if type(self).admit is MemoryStore.admit else None

    def admit_now(
        self,
        rates: Sequence[RateBucket],
        slots: Sequence[SlotBucket],
        lease_id: str,
        queue: QueueSpot | None = None,
        *,
        quotas: Sequence[QuotaBucket] = (),
        charge: Charge = ONE,
    ) -> AdmitResult:
        """`admit`, synchronously: it never awaits (one event loop, nothing to wait for)."""
        # Most plans' shape takes a shorter way to the same decision (`_admit_plain`).
        if charge is ONE and queue is None and not quotas and len(rates) == 1 and len(slots) == 1:
            rate, slot = rates[0], slots[0]
            if rate.exact and not rate.shadow and not slot.shadow and "*" not in lease_id:
                return self._admit_plain(rate, slot, lease_id)
        return self._admit(rates, slots, lease_id, queue, quotas, charge)

    def _admit_plain(self, rate: RateBucket, slot: SlotBucket, lease_id: str) -> AdmitResult:
        """`_admit` for one exact, enforced rate bucket and one enforced slot bucket, a request
        of one unit and one slot (a lease of one member), no quota, no queue: the same rule and
        the same writes with the general path's lists, loops and shadow checks left out.
        tests/store/test_memory_plain_path.py runs both on the same calls and compares them."""
        now = _round_to_us(self._clock() * 1000.0)  # self._now(), one call less
        window_ms = rate.window_ms
        window = self._windows.get(rate.key)
        count = 0
        reset = window_ms
        if window is not None:
            window.window_ms = window_ms
            times = window.times
            horizon = now - window_ms  # as _Window.purge, inline
            while times and times[0] <= horizon:
                times.popleft()
            count = len(times)
            if count:
                reset = math.ceil(times[0] + window_ms - now)
        status = 0
        retry_after = 0
        if count >= rate.limit:  # count + 1 > limit
            limit = rate.limit
            wait = window_ms if limit < 1 else math.ceil(times[count - limit] + window_ms - now)
            status = 1
            retry_after = max(0, math.ceil(wait))

        reclaimed = self._reclaim((slot,), now) if now >= self._earliest_expiry else 0
        key = slot.key
        leases = self._slots.get(key)
        jobs = self._jobs.members.get(key)
        taken = len(leases) if leases else 0
        if jobs:
            taken += len(jobs)
        if taken >= slot.limit and status == 0:  # taken + 1 > limit
            status = 2

        if status == 0:
            if window is None:
                window = self._windows[rate.key] = _Window(window_ms)
            window.times.append(now)
            if rate.counts_cost:
                window.owners[lease_id] = (now, 1)
            expiry = now + self._lease_ms
            if leases is None:
                leases = self._slots[key] = OrderedDict()
            leases[lease_id] = expiry
            leases.move_to_end(lease_id)
            self._held.add((key, lease_id))
            if expiry < self._earliest_expiry:
                self._earliest_expiry = expiry
        else:
            self._drop_empty((rate,), (slot,))
        if reclaimed:
            self._observer.slots_reclaimed(reclaimed)
        return AdmitResult(
            status == 0, _REASONS[status], retry_after, [count], [reset], [taken], reclaimed,
            False, "", None, None, None, None, now,  # None: an empty list (no quota, no shadow)
        )

    def _admit(
        self,
        rates: Sequence[RateBucket],
        slots: Sequence[SlotBucket],
        lease_id: str,
        queue: QueueSpot | None,
        quotas: Sequence[QuotaBucket],
        charge: Charge,
    ) -> AdmitResult:
        """The decision for any shape (admit.lua, step for step)."""
        if charge is not ONE:
            check_charge(charge)
        now = self._now()
        cost = charge.cost
        status = 0
        retry_after = 0
        rate_counts: list[int] = []
        rate_resets: list[int] = []
        # Shadow buckets that would refuse: written nothing (admit.lua's `skip`).
        shadow_refused: list[str] = []

        counter_views: dict[int, CounterState] = {}  # position in `rates` -> view
        for rate in rates:
            window_ms = rate.window_ms
            units = cost if rate.counts_cost else 1
            wait: float | None = None
            if not rate.exact:
                view = window_counter.seen_at(self._counters.get(rate.key), now, window_ms)
                counter_views[len(rate_counts)] = view
                rate_counts.append(window_counter.whole_count(view, now))
                rate_resets.append(0)  # known once the decision is (below)
                if not window_counter.admits(view, now, rate.limit, units):
                    wait = window_counter.retry_after_ms(view, now, rate.limit, units)
            else:
                window = self._windows.get(rate.key)
                if window is None:
                    count = 0
                else:
                    window.window_ms = window_ms
                    window.purge(now)
                    times = window.times
                    count = len(times)
                rate_counts.append(count)
                rate_resets.append(math.ceil(times[0] + window_ms - now) if count else window_ms)
                if count + units > rate.limit:
                    if units > rate.limit:
                        wait = window_ms  # it never fits
                    else:
                        # Admission needs count + units - limit entries gone.
                        wait = math.ceil(times[count + units - rate.limit - 1] + window_ms - now)
            if wait is not None:
                if rate.shadow:
                    shadow_refused.append(rate.key)
                else:
                    status = 1 if status != 4 else 4
                    retry_after = max(retry_after, math.ceil(wait))

        quota_counts: list[int] = []
        quota_resets: list[int] = []
        quota_granted: list[int] = []
        quota_views: list[tuple[int, int, int, int]] = []  # (index, used, granted, end_ms)
        for quota in quotas or ():
            index, end_ms, _ = self._period(now, quota.period)
            held = self._quotas.get(quota.key)
            used, granted = (held[1], held[2]) if held is not None and held[0] == index else (0, 0)
            quota_views.append((index, used, granted, end_ms))
            quota_counts.append(used)
            quota_resets.append(math.ceil(end_ms - now))
            quota_granted.append(granted)
            if used + (cost if quota.counts_cost else 1) > quota.limit + granted:
                if quota.shadow:
                    shadow_refused.append(quota.key)
                else:
                    status = 4
                    retry_after = max(retry_after, quota_resets[-1])

        # Nothing can have expired before the earliest expiry: skip the purge scans until then.
        reclaimed = self._reclaim(slots, now) if now >= self._earliest_expiry else 0
        slot_counts: list[int] = []
        job_members = self._jobs.members
        members = lease_members(lease_id)
        weight = len(members)
        arrival = float(queue.arrival) if queue is not None and queue.arrival else None
        for slot in slots:
            leases = self._slots.get(slot.key)
            jobs = job_members.get(slot.key)
            count = (len(leases) if leases else 0) + (len(jobs) if jobs else 0)
            if queue is not None and not slot.shadow:  # waiters ahead count as taken slots (admit.lua)
                if arrival is None:
                    count += len(self._queues.live(slot.key, now))
                else:
                    self._queues.live(slot.key, now)
                    for member in members[1:]:
                        self._queues.place(slot.key, member, arrival, now)
                    count += self._queues.place(slot.key, lease_id, arrival, now)
            slot_counts.append(count)
            if count + weight > slot.limit:
                if slot.shadow:
                    shadow_refused.append(slot.key)
                elif status == 0:
                    status = 2

        for position, view in counter_views.items():
            rate = rates[position]
            units = cost if rate.counts_cost else 1
            if status == 0 and units > 0 and rate.key not in shadow_refused:
                view = self._counters[rate.key] = window_counter.after_admission(view, units)
            rate_resets[position] = window_counter.reset_ms(view, now)

        if status == 0:
            for rate in rates:
                if not rate.exact or (shadow_refused and rate.key in shadow_refused):
                    continue
                if rate.counts_cost and not cost:
                    continue  # free: nothing written (admit.lua)
                window = self._windows.get(rate.key)
                if window is None:
                    window = self._windows[rate.key] = _Window(rate.window_ms)
                if not rate.counts_cost:
                    window.times.append(now)
                elif cost:
                    window.times.extend(itertools.repeat(now, cost))
                    window.owners[lease_id] = (now, cost)
            if quotas:
                for quota, (index, used, granted, end_ms) in zip(quotas, quota_views, strict=True):
                    units = cost if quota.counts_cost else 1
                    if units > 0 and quota.key not in shadow_refused:
                        self._quotas[quota.key] = [index, used + units, granted, end_ms + periods.DAY_MS]
            expiry = now + self._lease_ms
            for slot in slots:
                if shadow_refused and slot.key in shadow_refused:
                    continue
                leases = self._slots.get(slot.key)
                if leases is None:
                    leases = self._slots[slot.key] = OrderedDict()
                if weight == 1:
                    leases[lease_id] = expiry
                    leases.move_to_end(lease_id)
                else:
                    for member in members:
                        leases[member] = expiry
                        leases.move_to_end(member)
                self._held.add((slot.key, lease_id))
            if slots and expiry < self._earliest_expiry:
                self._earliest_expiry = expiry
        else:
            self._drop_empty(rates, slots)

        queued, place = False, ""
        if queue is not None:
            queued, place = self._queue_after(slots, queue, status, now, members)
        if reclaimed:
            self._observer.slots_reclaimed(reclaimed)
        # Positional: noticeably cheaper than keywords on this path (fields in AdmitResult's order).
        return AdmitResult(
            status == 0,
            _REASONS[status],
            retry_after,
            rate_counts,
            rate_resets,
            slot_counts,
            reclaimed,
            queued,
            place,
            quota_counts,
            quota_resets,
            quota_granted,
            shadow_refused,
            now,
        )

    def _reclaim(self, slots: Sequence[SlotBucket], now: float) -> int:
        """Purge the expired leases and job members of `slots`; return how many."""
        reclaimed = 0
        for slot in slots:
            leases = self._slots.get(slot.key)
            if leases is not None:
                reclaimed += _purge_expired(leases, now)
            reclaimed += self._jobs.live(slot.key, now)[1]
        return reclaimed

    def _queue_after(
        self, slots: Sequence[SlotBucket], queue: QueueSpot, status: int, now: float, members: list[str]
    ) -> tuple[bool, str]:
        """admit.lua's ending for a request that may wait: queued, or gone from the queues."""
        if status == 2:
            place = queue.arrival or f"{now:.3f}"
            for slot in slots:
                if not slot.shadow:
                    for member in members:
                        self._queues.refresh(slot.key, member, float(place), now + queue.ttl_ms)
            return True, place
        if queue.arrival:
            for slot in slots:
                if not slot.shadow:
                    for member in members:
                        self._queues.leave(slot.key, member)
        return False, queue.arrival

    def release(
        self, slots: Sequence[SlotBucket], lease_id: str, wake: bool = False,
        *, settlement: Settlement | None = None,
    ) -> None:
        members = lease_members(lease_id) if "*" in lease_id else None
        for slot in slots:
            self._held.discard((slot.key, lease_id))
            leases = self._slots.get(slot.key)
            if leases is not None:
                # An emptied bucket stays for the next admission; the heartbeat's sweep drops it.
                if members is None:
                    leases.pop(lease_id, None)
                else:
                    for member in members:
                        leases.pop(member, None)
        if settlement is not None and settlement.settled != settlement.charged:
            self._settle(lease_id, bounded(settlement))
        if wake:
            self._wake([slot.key for slot in slots])

    def _settle(self, lease_id: str, settlement: Settlement) -> None:
        """settle.lua's settlement, step for step (idempotent per lease id)."""
        if not (settlement.rates or settlement.quotas):
            return
        now = self._now()
        record = self._settled.get(lease_id)
        if record is not None and record > now:
            return
        charged, settled, at = settlement.charged, settlement.settled, settlement.admitted_at_ms
        delta = settled - charged
        for rate in settlement.rates:
            if not rate.exact:
                state = self._counters.get(rate.key)
                if state is None:
                    continue
                index = math.floor(at / state.window_ms)
                if state.window == index:
                    self._counters[rate.key] = CounterState(
                        state.window, max(0, state.count + delta), state.previous, state.window_ms)
                elif state.window == index + 1:
                    self._counters[rate.key] = CounterState(
                        state.window, state.count, max(0, state.previous + delta), state.window_ms)
                continue
            window = self._windows.get(rate.key)
            horizon = now - rate.window_ms
            if charged > 0:
                if window is None:
                    continue
                window.purge(now)
                owned = window.owners.get(lease_id)
                if owned is None or owned[0] <= horizon:
                    continue
                score = owned[0]
            else:
                if at <= horizon:
                    continue
                score = at
                if window is None:
                    window = self._windows[rate.key] = _Window(rate.window_ms)
                window.purge(now)
            held_units = window.owners[lease_id][1] if charged > 0 else 0
            window.owners[lease_id] = (score, settled)
            times = window.times
            for _ in range(held_units - settled):
                times.remove(score)
            if settled > held_units:
                position = bisect.bisect_right(times, score)
                for _ in range(settled - held_units):
                    times.insert(position, score)
        for quota in settlement.quotas:
            held = self._quotas.get(quota.key)
            if held is not None and held[0] == self._period(at, quota.period)[0]:
                held[1] = max(0, held[1] + delta)
        self._settled[lease_id] = now + self._settled_ttl_ms

    def leave_queue(self, slots: Sequence[SlotBucket], waiter_id: str) -> None:
        members = lease_members(waiter_id)
        for slot in slots:
            for member in members:
                self._queues.leave(slot.key, member)
        self._wake([slot.key for slot in slots])

    async def adjust_quota(self, quota: QuotaBucket, *, grant: int = 0, reset: bool = False) -> QuotaUsage:
        """quota.lua's adjustment: reset the current period and/or grant units in it."""
        scripts.check_grant(grant)
        now = self._now()
        index, end_ms, _ = self._period(now, quota.period)
        held = self._quotas.get(quota.key)
        used, granted = (held[1], held[2]) if held is not None and held[0] == index else (0, 0)
        if reset:
            used, granted = 0, 0
        granted += grant
        self._quotas[quota.key] = [index, used, granted, end_ms + periods.DAY_MS]
        return QuotaUsage(used, granted, math.ceil(end_ms - now))

    def _period(self, now: float, period: str) -> tuple[int, float, int]:
        """The quota period at store time `now`: (index, end in store time, length)."""
        index, end_ms, length = periods.period_of(now + self._wall_offset_ms, period)
        return index, end_ms - self._wall_offset_ms, length

    def _quota_usage(self, quota: QuotaBucket, now: float) -> QuotaUsage:
        index, end_ms, _ = self._period(now, quota.period)
        held = self._quotas.get(quota.key)
        used, granted = (held[1], held[2]) if held is not None and held[0] == index else (0, 0)
        return QuotaUsage(used, granted, math.ceil(end_ms - now))

    def watch(self, slots: Sequence[SlotBucket], event: asyncio.Event) -> Callable[[], None]:
        unwatch = self._wakeups.watch({hash_tag(slot.key) for slot in slots}, event)
        event.set()  # in place at once; said anyway, as the Redis store does on subscribing
        return unwatch

    def _wake(self, keys: Sequence[str]) -> None:
        for tag in {hash_tag(key) for key in keys}:
            self._wakeups.wake(tag)

    # -- jobs (gateway/store/jobs.py) ------------------------------------------------------

    async def hand_over(self, slots: Sequence[SlotBucket], lease_id: str, claim: JobClaim) -> bool:
        now = self._now()
        members = lease_members(lease_id)
        member = job_member(claim.job_id, len(members))
        if any(member in self._jobs.members.get(slot.key, ()) for slot in slots):
            return True  # a replay of this handover: it changes nothing (job_handover.lua)
        moved: list[str] = []
        job_expiry = now + claim.max_duration * 1000.0
        for slot in slots:
            self._held.discard((slot.key, lease_id))
            leases = self._slots.get(slot.key)
            if leases is None or lease_id not in leases:
                continue  # gone: that slot may be someone else's by now
            for held in members:
                leases.pop(held, None)
            if not leases:
                del self._slots[slot.key]
            for job_held in lease_members(member):
                self._jobs.add(slot.key, job_held, job_expiry)
            moved.append(slot.key)
        if not moved:
            return False
        self._earliest_expiry = min(self._earliest_expiry, job_expiry)
        expiry = now + (claim.max_duration + INDEX_SLACK_SECONDS) * 1000.0
        if self._jobs.index(claim.job_id, claim.owner, member, tuple(moved), expiry, now):
            return True
        self._jobs.remove(moved, member)  # an end was reported before the handover landed
        self._wake(moved)
        return False

    async def end(self, job_id: str, owner: str | None) -> EndedJob | None:
        entry = self._jobs.take(job_id, owner, self._now(), TOMBSTONE_SECONDS * 1000.0)
        if entry is None:
            return None
        self._jobs.remove(entry.keys, entry.member)
        self._wake(entry.keys)
        return EndedJob(job_id, entry.owner)

    async def usage(
        self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], quotas: Sequence[QuotaBucket] = ()
    ) -> Usage:
        now = self._now()
        rate_counts = []
        for rate in rates:
            if not rate.exact:
                view = window_counter.seen_at(self._counters.get(rate.key), now, rate.window_ms)
                rate_counts.append(window_counter.whole_count(view, now))
                continue
            window = self._windows.get(rate.key)
            horizon = now - rate.window_ms
            rate_counts.append(sum(1 for t in window.times if t > horizon) if window else 0)
        slot_counts, jobs = [], []
        for slot in slots:
            leases: Mapping[str, float] = self._slots.get(slot.key) or {}
            members = self._jobs.members.get(slot.key) or {}
            live = [(job_id_of(m), math.ceil(expiry - now)) for m, expiry in members.items() if expiry > now]
            slot_counts.append(sum(1 for expiry in leases.values() if expiry > now) + len(live))
            jobs.append([ActiveJob(job_id, left) for job_id, left in live if job_id is not None])
        return Usage(rate_counts, slot_counts, jobs, [self._quota_usage(quota, now) for quota in quotas])

    async def flush(self) -> None:
        """Releases apply at once here; kept for parity with the Redis store."""

    async def renew(self) -> int:
        """One heartbeat: extend every held lease still alive; return (and report) how many
        were found lost (already expired, or purged by an admission)."""
        now = self._now()
        expiry = now + self._lease_ms
        lost = 0
        renewed = False
        for pair in list(self._held):
            key, lease_id = pair
            leases = self._slots.get(key)
            current = leases.get(lease_id) if leases is not None else None
            if leases is None or current is None or current <= now:
                self._held.discard(pair)
                lost += 1
                continue
            for member in lease_members(lease_id):  # renew.lua: ZADD XX of every member
                if member in leases:
                    leases[member] = expiry
                    leases.move_to_end(member)
            renewed = True
        if renewed:  # later than before, unless an injected clock stepped back
            self._earliest_expiry = min(self._earliest_expiry, expiry)
        if lost:
            self._observer.leases_lost(lost)
        return lost

    async def check_ready(self) -> None:
        probe = SlotBucket(f"{self.ready_tag}:probe", 1 << 30)
        lease_id = f"ready:{uuid.uuid4().hex}"
        await self.admit((), (probe,), lease_id)
        self.release((probe,), lease_id)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            await self.renew()
            self._sweep()

    def _sweep(self) -> None:
        """Purge idle buckets nobody touches any more, so memory follows live state."""
        now = self._now()
        for key in list(self._windows):
            window = self._windows[key]
            window.purge(now)
            if not window.times:
                del self._windows[key]
            elif window.owners:
                horizon = now - window.window_ms
                window.owners = {lease: owned for lease, owned in window.owners.items() if owned[0] > horizon}
        for key in [key for key, held in self._quotas.items() if held[3] <= now]:
            del self._quotas[key]
        for lease_id in [lease for lease, until in self._settled.items() if until <= now]:
            del self._settled[lease_id]
        for key in list(self._counters):
            state = self._counters[key]
            view = window_counter.seen_at(state, now, state.window_ms)
            if view.count == 0 and view.previous == 0:
                del self._counters[key]  # nothing counted in this fixed window or the one before
        reclaimed = 0
        for key in list(self._slots):
            leases = self._slots[key]
            reclaimed += _purge_expired(leases, now)
            if not leases:
                del self._slots[key]
        reclaimed += self._jobs.sweep(now)
        self._earliest_expiry = self._earliest_live_expiry()
        self._queues.sweep(now)
        if reclaimed:
            self._observer.slots_reclaimed(reclaimed)

    def _earliest_live_expiry(self) -> float:
        """The earliest expiry held now (the first lease of each bucket: they are in expiry order)."""
        first_leases = (next(iter(leases.values())) for leases in self._slots.values() if leases)
        jobs = (expiry for members in self._jobs.members.values() for expiry in members.values())
        return min(itertools.chain(first_leases, jobs), default=math.inf)

    def _drop_empty(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket]) -> None:
        for rate in rates:
            window = self._windows.get(rate.key)
            if rate.exact and window is not None and not window.times:
                del self._windows[rate.key]
        for slot in slots:
            if self._slots.get(slot.key) == {}:
                del self._slots[slot.key]


_REASONS = {0: None, 1: "rate", 2: "concurrency", 4: "quota"}


def _purge_expired(leases: OrderedDict[str, float], now: float) -> int:
    """Drop leases whose expiry is <= now (they sit first: expiry order); count them."""
    purged = 0
    while leases:
        lease_id, expiry = next(iter(leases.items()))
        if expiry > now:
            break
        del leases[lease_id]
        purged += 1
    return purged


def _round_to_us(ms: float) -> float:
    """`round(ms, 3)` without its slow decimal conversion whenever that gives the same float.

    Half-integers are floats below 2**52 and float rounding is monotonic, so unless `us` lands
    exactly on one (maybe a tie, left to round()), it lies between the same two half-integers
    as the exact `ms * 1000`: both round to the same whole µs, and `whole / 1000.0` is the float
    nearest that decimal, which is what round() returns.
    """
    us = ms * 1000.0
    if 1.0 <= us < 2.0**52:  # half-integers are exact below 2**52 (folded to a constant)
        whole = round(us)
        if abs(us - whole) != 0.5:
            return whole / 1000.0
    return round(ms, 3)

