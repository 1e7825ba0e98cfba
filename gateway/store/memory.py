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

Job members (slots held by async jobs, with their own expiry) and waiter queues live beside
the leases (gateway/store/memory_jobs.py) and count exactly as admit.lua counts them; wake-ups
are direct (`LocalWakeups`): a release with `wake=True` sets the waiters' events at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence

from gateway.store import window_counter
from gateway.store.base import (
    AdmitResult,
    NullObserver,
    QueueSpot,
    RateBucket,
    SlotBucket,
    StoreObserver,
)
from gateway.store.jobs import (
    INDEX_SLACK_SECONDS,
    TOMBSTONE_SECONDS,
    ActiveJob,
    EndedJob,
    JobClaim,
    Usage,
    job_member,
)
from gateway.store.memory_jobs import MemoryJobBook, MemoryQueues
from gateway.store.scripts import hash_tag
from gateway.store.wakeups import LocalWakeups
from gateway.store.window_counter import CounterState


class _Window:
    __slots__ = ("window_ms", "times")

    def __init__(self, window_ms: float) -> None:
        self.window_ms = window_ms
        self.times: deque[float] = deque()

    def purge(self, now: float) -> None:
        # An admission counts while its time lies in (now - window, now].
        horizon = now - self.window_ms
        times = self.times
        while times and times[0] <= horizon:
            times.popleft()


class MemoryStore:
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
    ) -> AdmitResult:
        now = self._now()
        status = 0
        retry_after = 0
        rate_counts: list[int] = []
        rate_resets: list[int] = []

        counter_views: dict[int, CounterState] = {}  # position in `rates` -> view
        for rate in rates:
            window_ms = rate.window_ms
            if not rate.exact:
                view = window_counter.seen_at(self._counters.get(rate.key), now, window_ms)
                counter_views[len(rate_counts)] = view
                rate_counts.append(window_counter.whole_count(view, now))
                rate_resets.append(0)  # known once the decision is (below)
                if not window_counter.admits(view, now, rate.limit):
                    status = 1
                    retry_after = max(retry_after, window_counter.retry_after_ms(view, now, rate.limit))
                continue
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
            if count >= rate.limit:
                status = 1
                wait: float = window_ms
                if rate.limit > 0:
                    # Admission needs count - limit + 1 entries gone.
                    wait = times[count - rate.limit] + window_ms - now
                retry_after = max(retry_after, math.ceil(wait))

        # Nothing can have expired before the earliest expiry: skip the purge scans until then.
        reclaimed = self._reclaim(slots, now) if now >= self._earliest_expiry else 0
        slot_counts: list[int] = []
        job_members = self._jobs.members
        arrival = float(queue.arrival) if queue is not None and queue.arrival else None
        for slot in slots:
            leases = self._slots.get(slot.key)
            jobs = job_members.get(slot.key)
            count = (len(leases) if leases else 0) + (len(jobs) if jobs else 0)
            if queue is not None:  # waiters ahead count as taken slots (admit.lua)
                if arrival is None:
                    count += len(self._queues.live(slot.key, now))
                else:
                    self._queues.live(slot.key, now)
                    count += self._queues.place(slot.key, queue.waiter_id, arrival, now)
            slot_counts.append(count)
            if count >= slot.limit and status == 0:
                status = 2

        for position, view in counter_views.items():
            if status == 0:
                view = self._counters[rates[position].key] = window_counter.after_admission(view)
            rate_resets[position] = window_counter.reset_ms(view, now)

        if status == 0:
            for rate in rates:
                if not rate.exact:
                    continue
                window = self._windows.get(rate.key)
                if window is None:
                    window = self._windows[rate.key] = _Window(rate.window_ms)
                window.times.append(now)
            expiry = now + self._lease_ms
            for slot in slots:
                leases = self._slots.get(slot.key)
                if leases is None:
                    leases = self._slots[slot.key] = OrderedDict()
                leases[lease_id] = expiry
                leases.move_to_end(lease_id)
                self._held.add((slot.key, lease_id))
            if slots and expiry < self._earliest_expiry:
                self._earliest_expiry = expiry
        else:
            self._drop_empty(rates, slots)

        queued, place = False, ""
        if queue is not None:
            queued, place = self._queue_after(slots, queue, status, now)
        if reclaimed:
            self._observer.slots_reclaimed(reclaimed)
        # Positional: noticeably cheaper than keywords on this path (fields in AdmitResult's order).
        return AdmitResult(
            status == 0,
            None if status == 0 else ("rate" if status == 1 else "concurrency"),
            retry_after,
            rate_counts,
            rate_resets,
            slot_counts,
            reclaimed,
            queued,
            place,
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
        self, slots: Sequence[SlotBucket], queue: QueueSpot, status: int, now: float
    ) -> tuple[bool, str]:
        """admit.lua's ending for a request that may wait: queued, or gone from the queues."""
        if status == 2:
            place = queue.arrival or f"{now:.3f}"
            for slot in slots:
                self._queues.refresh(slot.key, queue.waiter_id, float(place), now + queue.ttl_ms)
            return True, place
        if queue.arrival:
            for slot in slots:
                self._queues.leave(slot.key, queue.waiter_id)
        return False, queue.arrival

    def release(self, slots: Sequence[SlotBucket], lease_id: str, wake: bool = False) -> None:
        for slot in slots:
            self._held.discard((slot.key, lease_id))
            leases = self._slots.get(slot.key)
            if leases is not None:
                # An emptied bucket stays for the next admission; the heartbeat's sweep drops it.
                leases.pop(lease_id, None)
        if wake:
            self._wake([slot.key for slot in slots])

    def leave_queue(self, slots: Sequence[SlotBucket], waiter_id: str) -> None:
        for slot in slots:
            self._queues.leave(slot.key, waiter_id)
        self._wake([slot.key for slot in slots])

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
        member = job_member(claim.job_id)
        if any(member in self._jobs.members.get(slot.key, ()) for slot in slots):
            return True  # a replay of this handover: it changes nothing (job_handover.lua)
        moved: list[str] = []
        job_expiry = now + claim.max_duration * 1000.0
        for slot in slots:
            self._held.discard((slot.key, lease_id))
            leases = self._slots.get(slot.key)
            if leases is None or lease_id not in leases:
                continue  # gone: that slot may be someone else's by now
            del leases[lease_id]
            if not leases:
                del self._slots[slot.key]
            self._jobs.add(slot.key, member, job_expiry)
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

    async def usage(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket]) -> Usage:
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
            live = [(m[2:], math.ceil(expiry - now)) for m, expiry in members.items() if expiry > now]
            slot_counts.append(sum(1 for expiry in leases.values() if expiry > now) + len(live))
            jobs.append([ActiveJob(job_id, left) for job_id, left in live])
        return Usage(rate_counts, slot_counts, jobs)

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
            leases[lease_id] = expiry
            leases.move_to_end(lease_id)
            renewed = True
        if renewed:  # later than before, unless an injected clock stepped back
            self._earliest_expiry = min(self._earliest_expiry, expiry)
        if lost:
            self._observer.leases_lost(lost)
        return lost

    async def check_ready(self) -> None:
        probe = SlotBucket("memory:{ready}:probe", 1 << 30)
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
    if 1.0 <= us < _HALF_INTEGERS_EXACT_BELOW:
        whole = round(us)
        if abs(us - whole) != 0.5:
            return whole / 1000.0
    return round(ms, 3)


_HALF_INTEGERS_EXACT_BELOW = 2.0**52
