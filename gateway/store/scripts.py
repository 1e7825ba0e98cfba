"""The Lua scripts of the Redis store: their text, their SHA1, how to call them and how to
read their replies. Pure: no I/O beyond reading the packaged `.lua` files once."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from gateway.store.base import AdmitResult, QueueSpot, RateBucket, SlotBucket, StoreError

_STATUS_REASON = {0: None, 1: "rate", 2: "concurrency"}


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes
    sha: str


_NOW_DIRECTIVE = re.compile(rb"^--#now (ARGV\[\d+\])$", re.MULTILINE)


def _lua(name: str) -> bytes:
    return resources.files("gateway.store").joinpath("lua", f"{name}.lua").read_bytes()


def assemble(source: bytes) -> bytes:
    """A script's text as Redis runs it: each `--#now ARGV[n]` line becomes the one "now from
    ARGV[n], else Redis TIME" preamble (lua/now.lua), so that rule is written once."""
    preamble = b"\n".join(line for line in _lua("now").splitlines() if not line.startswith(b"--"))

    def expand(match: re.Match[bytes]) -> bytes:
        return preamble.replace(b"NOW_ARG", match.group(1))

    return _NOW_DIRECTIVE.sub(expand, source)


@cache
def load(name: str) -> Script:
    source = assemble(_lua(name))
    return Script(name, source, hashlib.sha1(source).hexdigest())


def now_arg(clock_seconds: float | None) -> str:
    """ARGV form of "now": empty lets the script read Redis TIME; a driven clock is sent
    in ms, rounded to the microsecond so a clock in whole ms stays whole."""
    if clock_seconds is None:
        return ""
    return repr(round(clock_seconds * 1000.0, 3))


def ms_arg(seconds: float) -> str:
    return repr(round(seconds * 1000.0, 3))


def admit_call(
    rates: Sequence[RateBucket],
    slots: Sequence[SlotBucket],
    lease_id: str,
    lease_ms: str,
    now: str,
    queue: QueueSpot | None = None,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of admit.lua (see its header)."""
    keys = [bucket.key for bucket in rates]
    keys.extend(bucket.key for bucket in slots)
    args: list[str | int] = [lease_id, lease_ms, now, len(rates), "", ""]
    if queue is not None:
        args[4], args[5] = queue.ttl_ms, queue.arrival
        for bucket in slots:
            keys.extend(queue_keys(bucket.key))
    keys.append(undone_key(keys[0]))
    for rate in rates:
        args.append(rate.limit)
        args.append(rate.window_ms)
        args.append(0 if rate.exact else 1)
    args.extend(slot.limit for slot in slots)
    return keys, args


def undo_call(
    rates: Sequence[RateBucket],
    slots: Sequence[SlotBucket],
    lease_id: str,
    lease_ms: str,
    now: str,
    ttl_ms: str,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of undo.lua: take back `lease_id`'s admission into these buckets."""
    keys = [bucket.key for bucket in rates]
    keys.extend(bucket.key for bucket in slots)
    keys.append(undone_key(keys[0]))
    args: list[str | int] = [lease_id, lease_ms, now, len(rates), ttl_ms]
    for rate in rates:
        args.append(rate.window_ms)
        args.append(0 if rate.exact else 1)
    return keys, args


def undone_key(any_key: str) -> str:
    """The set of undone lease ids for the hash tag of `any_key` (one per tag, in its slot)."""
    start = any_key.find("{")
    if start >= 0:
        end = any_key.find("}", start + 1)
        if end > start + 1:
            return f"{any_key[: end + 1]}:undone"
    return f"{{{any_key}}}:undone"


def queue_keys(slot_key: str) -> tuple[str, str]:
    """A slot bucket's waiter queue (by arrival) and its twin (by entry expiry)."""
    return f"{slot_key}:q", f"{slot_key}:qx"


def decode_admit(reply: object, lease_id: str, n_rate: int, n_slot: int, queued: bool = False) -> AdmitResult:
    """Turn admit.lua's reply into an AdmitResult, refusing a reply meant for another call
    (a connection one reply out of step would otherwise hand out someone else's answer).
    `queued`: the call carried a QueueSpot, so the reply ends with (queued, arrival)."""
    extra = 2 if queued else 0
    if isinstance(reply, list) and len(reply) == 2 and str(reply[1]) == "3":
        raise StoreError("admission arrived after it was undone")
    if not isinstance(reply, list) or len(reply) != 4 + 2 * n_rate + n_slot + extra:
        raise StoreError(f"malformed admit reply: {reply!r:.200}")
    place = ""
    tail: list[object] = [0, ""]
    if queued:
        tail, reply = reply[-2:], reply[:-2]
        arrival = tail[1]
        place = arrival.decode() if isinstance(arrival, bytes) else str(arrival)
    echoed = reply[0]
    if isinstance(echoed, bytes):
        echoed = echoed.decode("utf-8", "replace")
    if echoed != lease_id:
        raise StoreError("admit reply belongs to another call (lease id mismatch)")
    try:
        # Lua integers arrive as ints already: int() only checks them (map: no Python frame).
        numbers = list(map(int, reply[1:]))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"malformed admit reply: {reply!r:.200}") from exc
    status = numbers[0]
    if status not in _STATUS_REASON:
        raise StoreError(f"unknown admit status {status}")
    # numbers: status, retry after, reclaimed, rate counts, rate resets, slot counts.
    rate_end = 3 + n_rate
    slot_start = rate_end + n_rate
    return AdmitResult(
        admitted=status == 0,
        reason=_STATUS_REASON[status],
        retry_after_ms=numbers[1],
        rate_counts=numbers[3:rate_end],
        rate_reset_ms=numbers[rate_end:slot_start],
        slot_counts=numbers[slot_start:],
        reclaimed=numbers[2],
        queued=queued and str(tail[0]) == "1",
        arrival=place,
    )


def renew_call(
    pairs: Sequence[tuple[str, str]], lease_ms: str, now: str
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of renew.lua for (key, lease_id) pairs sharing one hash tag."""
    index: dict[str, int] = {}
    args: list[str | int] = [lease_ms, now]
    for key, lease_id in pairs:
        position = index.setdefault(key, len(index) + 1)
        args.append(position)
        args.append(lease_id)
    return list(index), args


def decode_renew(reply: object, n_pairs: int) -> list[int]:
    """0-based positions of the pairs renew.lua reported lost."""
    if not isinstance(reply, list):
        raise StoreError(f"malformed renew reply: {reply!r:.200}")
    try:
        lost = [int(value) - 1 for value in reply]
    except (TypeError, ValueError) as exc:
        raise StoreError(f"malformed renew reply: {reply!r:.200}") from exc
    if any(not 0 <= position < n_pairs for position in lost):
        raise StoreError("renew reply out of range")
    return lost


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first non-empty {...}, else the key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key
