"""The memory store's waiter queues and job slots: admit.lua's queues and the job scripts'
state (job_index.lua, job_handover.lua, job_free.lua, job_drop.lua) for one process.

Times are float milliseconds of the memory store's clock. Queue order is (arrival, waiter id),
as a Redis sorted set orders equal scores by member.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.store.base import lease_members

# Ends reported for jobs nobody holds, remembered at once: each is kept TOMBSTONE_SECONDS, so
# without a bound a stream of `done` calls for unknown ids would grow the process for that long.
MAX_TOMBSTONES = 10_000


class MemoryQueues:
    """slot key -> waiter id -> [arrival, entry expiry]."""

    def __init__(self) -> None:
        self._queues: dict[str, dict[str, list[float]]] = {}

    def live(self, key: str, now: float) -> dict[str, list[float]]:
        """The queue of `key` without its expired entries (an empty dict when none)."""
        queue = self._queues.get(key)
        if queue is None:
            return {}
        for waiter in [w for w, (_, expiry) in queue.items() if expiry <= now]:
            del queue[waiter]
        if not queue:
            del self._queues[key]
            return {}
        return queue

    def place(self, key: str, waiter: str, arrival: float, now: float) -> int:
        """(Re)place a waiter at its arrival; return how many are ahead of it."""
        queue = self._queues.setdefault(key, {})
        entry = queue.get(waiter)
        if entry is None:
            queue[waiter] = [arrival, now]  # expiry set by `refresh`, or the entry removed
        else:
            entry[0] = arrival
        return sum(1 for other, (at, _) in queue.items() if (at, other) < (arrival, waiter))

    def refresh(self, key: str, waiter: str, arrival: float, expiry: float) -> None:
        self._queues.setdefault(key, {})[waiter] = [arrival, expiry]

    def leave(self, key: str, waiter: str) -> None:
        queue = self._queues.get(key)
        if queue is not None and queue.pop(waiter, None) is not None and not queue:
            del self._queues[key]

    def sweep(self, now: float) -> None:
        for key in list(self._queues):
            self.live(key, now)

    def __len__(self) -> int:
        return len(self._queues)


@dataclass(slots=True)
class _Indexed:
    owner: str
    member: str
    keys: tuple[str, ...]
    expiry: float
    ended: bool = False  # kept (until `expiry`, the tombstone time) once ended, as job_free.lua does


@dataclass(slots=True)
class _Tombstone:
    owners: set[str] = field(default_factory=set)
    expiry: float = 0.0


class MemoryJobBook:
    """Job members per slot key (counted with the leases), the job index and tombstones."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, float]] = {}  # slot key -> member -> expiry
        self._index: dict[str, _Indexed] = {}
        self._tombstones: dict[str, _Tombstone] = {}

    def live(self, key: str, now: float) -> tuple[int, int]:
        """(live job members of `key`, expired ones purged now)."""
        members = self.members.get(key)
        if members is None:
            return 0, 0
        dead = [member for member, expiry in members.items() if expiry <= now]
        for member in dead:
            del members[member]
        if not members:
            del self.members[key]
        return len(members), len(dead)

    def add(self, key: str, member: str, expiry: float) -> None:
        self.members.setdefault(key, {})[member] = expiry

    def remove(self, keys: tuple[str, ...] | list[str], member: str) -> None:
        """job_drop.lua: every member of the job's lease (base.lease_members) leaves `keys`."""
        held = lease_members(member)
        for key in keys:
            members = self.members.get(key)
            if members is None:
                continue
            for one in held:
                members.pop(one, None)
            if not members:
                del self.members[key]

    def index(
        self, job_id: str, owner: str, member: str, keys: tuple[str, ...], expiry: float, now: float
    ) -> bool:
        """job_index.lua: record the holder. False (nothing recorded) when an end was reported
        first, or when the id is already indexed for another key or for a job that ended; True,
        changing nothing, for the same key's job still running (a replay)."""
        tomb = self._tombstones.get(job_id)
        if tomb is not None and tomb.expiry > now and ({"*", owner} & tomb.owners):
            return False
        held = self._live_entry(job_id, now)
        if held is not None:
            return held.owner == owner and not held.ended
        self._index[job_id] = _Indexed(owner, member, keys, expiry)
        return True

    def take(self, job_id: str, owner: str | None, now: float, tombstone_ms: float) -> _Indexed | None:
        """job_free.lua: the index entry when `owner` (or the admin, None) ends the job now. The
        entry stays, marked ended, for the tombstone time: a handover of the same id landing
        later (a late replay, or the id given out again) then holds nothing, as on Redis."""
        entry = self._live_entry(job_id, now)
        if entry is not None:
            if (owner is not None and owner != entry.owner) or entry.ended:
                return None
            entry.ended = True
            entry.expiry = now + tombstone_ms
            return entry
        tomb = self._tombstones.pop(job_id, None)
        if tomb is None or tomb.expiry <= now:
            tomb = _Tombstone()
            if len(self._tombstones) >= MAX_TOMBSTONES:
                # the oldest: of all, its handover is the least likely to be still on its way
                del self._tombstones[next(iter(self._tombstones))]
        tomb.owners.add(owner or "*")
        tomb.expiry = now + tombstone_ms
        self._tombstones[job_id] = tomb  # (re)inserted last: the table stays in expiry order
        return None

    def _live_entry(self, job_id: str, now: float) -> _Indexed | None:
        """The index entry of `job_id` unless it expired (an expired one is dropped)."""
        entry = self._index.get(job_id)
        if entry is not None and entry.expiry <= now:
            del self._index[job_id]
            return None
        return entry

    def sweep(self, now: float) -> int:
        """Drop what expired; returns the job members purged (reclaimed slots)."""
        reclaimed = 0
        for key in list(self.members):
            reclaimed += self.live(key, now)[1]
        for job_id in [j for j, entry in self._index.items() if entry.expiry <= now]:
            del self._index[job_id]
        for job_id in [j for j, tomb in self._tombstones.items() if tomb.expiry <= now]:
            del self._tombstones[job_id]
        return reclaimed

    @property
    def empty(self) -> bool:
        return not (self.members or self._index or self._tombstones)
