"""The Lua scripts of the Redis store: their text, their SHA1, how to call them and how to
read their replies. Pure: no I/O beyond reading the packaged `.lua` files once."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

from gateway.store.base import (
    AdmitResult,
    QueueSpot,
    QuotaBucket,
    QuotaUsage,
    RateBucket,
    Settlement,
    SlotBucket,
    StoreError,
)

_STATUS_REASON = {0: None, 1: "rate", 2: "concurrency", 4: "quota"}


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes
    sha: str


_NOW_DIRECTIVE = re.compile(rb"^--#now (ARGV\[\d+\])$", re.MULTILINE)
_INCLUDE_DIRECTIVE = re.compile(rb"^--#include (\w+)$", re.MULTILINE)


def _lua(name: str) -> bytes:
    return resources.files("gateway.store").joinpath("lua", f"{name}.lua").read_bytes()


def assemble(source: bytes) -> bytes:
    """A script's text as Redis runs it: each `--#now ARGV[n]` line becomes the one "now from
    ARGV[n], else Redis TIME" preamble (lua/now.lua), and each `--#include name` line the text
    of lua/name.lua (periods.lua: quota periods and lease members), so each rule is written once."""
    preamble = b"\n".join(line for line in _lua("now").splitlines() if not line.startswith(b"--"))

    def expand(match: re.Match[bytes]) -> bytes:
        return preamble.replace(b"NOW_ARG", match.group(1))

    source = _INCLUDE_DIRECTIVE.sub(lambda match: _lua(match.group(1).decode()), source)
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
    quotas: Sequence[QuotaBucket] = (),
    cost: int = 1,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of admit.lua (see its header)."""
    keys = [bucket.key for bucket in rates]
    if quotas:
        keys.extend(bucket.key for bucket in quotas)
    keys.extend(bucket.key for bucket in slots)
    args: list[str | int] = [lease_id, lease_ms, now, len(rates), "", "", cost, len(quotas)]
    if queue is not None:
        args[4], args[5] = queue.ttl_ms, queue.arrival
        for bucket in slots:
            keys.extend(queue_keys(bucket.key))
    if not slots and untraceable(rates):
        keys.append(trace_key(keys[0]))
    keys.append(undone_key(keys[0]))
    for rate in rates:
        # Flags inline (no call per bucket): 1 counter, 2 counts cost, 4 shadow.
        args += (rate.limit, rate.window_ms,
                 (0 if rate.exact else 1) | (2 if rate.counts_cost else 0) | (4 if rate.shadow else 0))
    for quota in quotas:
        args += (quota.limit, quota.period, (2 if quota.counts_cost else 0) | (4 if quota.shadow else 0))
    for slot in slots:
        args += (slot.limit, 1 if slot.shadow else 0)
    return keys, args


def untraceable(rates: Sequence[RateBucket]) -> bool:
    """No sliding log among `rates`: with no slot bucket either, an admission leaves no entry of
    its lease id, so admit.lua records it in the tag's trace set (replays and undo find it)."""
    return all(not rate.exact for rate in rates)


def trace_key(any_key: str) -> str:
    """The set of recent lease ids admitted with no log or slot to find them by (admit.lua)."""
    return undone_key(any_key)[: -len(":undone")] + ":admitted"


def rate_flags(rate: RateBucket) -> int:
    """admit.lua's flags of a rate bucket: 1 counter, 2 counts cost, 4 shadow."""
    return (0 if rate.exact else 1) + (2 if rate.counts_cost else 0) + (4 if rate.shadow else 0)


def undo_call(
    rates: Sequence[RateBucket],
    slots: Sequence[SlotBucket],
    lease_id: str,
    lease_ms: str,
    now: str,
    ttl_ms: str,
    quotas: Sequence[QuotaBucket] = (),
    cost: int = 1,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of undo.lua: take back `lease_id`'s admission into these buckets."""
    keys = [bucket.key for bucket in rates]
    keys.extend(bucket.key for bucket in quotas)
    keys.extend(bucket.key for bucket in slots)
    traced = not slots and untraceable(rates)
    if traced:
        keys.append(trace_key(keys[0]))
    keys.append(undone_key(keys[0]))
    args: list[str | int] = [lease_id, lease_ms, now, len(rates), ttl_ms, cost, len(quotas), 1 if traced else 0]
    for rate in rates:
        args.append(rate.window_ms)
        args.append(rate_flags(rate))
    for quota in quotas:
        args.append(quota.period)
        args.append((2 if quota.counts_cost else 0) + (4 if quota.shadow else 0))
    return keys, args


def settle_call(
    slots: Sequence[SlotBucket],
    lease_id: str,
    settlement: Settlement | None,
    now: str,
    ttl_ms: str,
    channels: Sequence[str] = (),
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of settle.lua: free `lease_id`'s slots and apply `settlement` (see its header)."""
    rates = settlement.rates if settlement is not None else ()
    quotas = settlement.quotas if settlement is not None else ()
    keys = [bucket.key for bucket in rates]
    keys.extend(bucket.key for bucket in quotas)
    keys.extend(bucket.key for bucket in slots)
    keys.append(settled_key(keys[0]))
    if settlement is None:
        args: list[str | int] = [lease_id, now, 0, 0, 0, 0, "0", ttl_ms, len(channels), *channels]
        return keys, args
    args = [lease_id, now, len(rates), len(quotas), settlement.charged, settlement.settled,
            repr(float(settlement.admitted_at_ms)), ttl_ms, len(channels), *channels]
    for rate in rates:
        args.append(rate.window_ms)
        args.append(0 if rate.exact else 1)
    args.extend(quota.period for quota in quotas)
    return keys, args


def settle_release(keys: list[str], args: list[str | int]) -> tuple[list[str], str, list[str]]:
    """What a settle.lua call (`settle_call`) frees: its slot keys, lease id and wake-up channels
    (a settlement given up is released as a plain release)."""
    priced = int(args[2]) + int(args[3])  # rate and quota keys come first, the settled set last
    return keys[priced:-1], str(args[0]), [str(channel) for channel in args[9:9 + int(args[8])]]


def settled_key(any_key: str) -> str:
    """The set of settled lease ids for the hash tag of `any_key` (settle.lua's memory)."""
    return undone_key(any_key)[: -len(":undone")] + ":settled"


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


class AdmitLayout:
    """Where each number sits in admit.lua's reply for a call with `n_rate` rate buckets,
    `n_slot` slot buckets and `n_quota` quotas (`queued`: it carried a QueueSpot, so the reply
    ends with (queued, arrival)); computed once per shape, not per reply."""

    __slots__ = ("queued", "min_length", "rate_counts", "rate_resets", "slot_counts", "quotas",
                 "shadow_at", "length")

    def __init__(self, n_rate: int, n_slot: int, n_quota: int, queued: bool) -> None:
        # The reply: lease id, status, retry after, reclaimed, now, rate counts, rate resets,
        # slot counts, quota counts, quota resets, quota grants, n_shadow, shadow positions
        # (then, queued, the queued flag and the arrival).
        rate_end = 5 + n_rate
        slot_start = rate_end + n_rate
        quota_start = slot_start + n_slot
        self.queued = queued
        self.min_length = 6 + 2 * n_rate + n_slot + 3 * n_quota + (2 if queued else 0)
        self.rate_counts = slice(5, rate_end)
        self.rate_resets = slice(rate_end, slot_start)
        self.slot_counts = slice(slot_start, quota_start)
        # None without quotas: three empty lists, no slicing.
        self.quotas = (slice(quota_start, quota_start + n_quota),
                       slice(quota_start + n_quota, quota_start + 2 * n_quota),
                       slice(quota_start + 2 * n_quota, quota_start + 3 * n_quota)) if n_quota else None
        self.shadow_at = quota_start + 3 * n_quota
        self.length = self.shadow_at + 1  # the reply with no shadow position (and not queued)

    def decode(self, reply: object, lease_id: str, keys: Sequence[str] = (), echo: bytes | None = None,
               ) -> AdmitResult:
        """decode_admit for this layout (see there); `echo`: the lease id as sent, when known
        (what Redis echoes: compared as is, no decoding)."""
        if not isinstance(reply, list) or len(reply) < self.min_length:
            if isinstance(reply, list) and len(reply) == 2 and str(reply[1]) == "3":
                raise StoreError("admission arrived after it was undone")
            raise StoreError(f"malformed admit reply: {reply!r:.200}")
        place = ""
        queued = False
        if self.queued:
            flag, arrival = reply[-2:]
            reply = reply[:-2]
            place = arrival.decode() if isinstance(arrival, bytes) else str(arrival)
            queued = str(flag) == "1"
        echoed = reply[0]
        if echoed != echo:
            if isinstance(echoed, bytes):
                echoed = echoed.decode("utf-8", "replace")
            if echoed != lease_id:
                raise StoreError("admit reply belongs to another call (lease id mismatch)")
        try:
            # Lua numbers arrive as ints: one sum() (C, no int() per number) checks that every
            # one is a number (a string or nil raises TypeError).
            sum(reply[1:])
        except TypeError as exc:
            raise StoreError(f"malformed admit reply: {reply!r:.200}") from exc
        status = reply[1]
        if status not in _STATUS_REASON:
            raise StoreError(f"unknown admit status {status}")
        n_shadow = reply[self.shadow_at]
        if len(reply) != self.length + n_shadow:
            raise StoreError(f"malformed admit reply: {reply!r:.200}")
        quotas = self.quotas
        # Positional: cheaper than keywords on this path (fields in AdmitResult's order).
        return AdmitResult(
            status == 0,
            _STATUS_REASON[status],
            reply[2],
            reply[self.rate_counts],
            reply[self.rate_resets],
            reply[self.slot_counts],
            reply[3],
            queued,
            place,
            reply[quotas[0]] if quotas else [],
            reply[quotas[1]] if quotas else [],
            reply[quotas[2]] if quotas else [],
            [keys[position - 1] for position in reply[self.length :]] if n_shadow else [],
            reply[4] / 1000.0,  # now, sent in whole µs
        )


@lru_cache(maxsize=256)
def admit_layout(n_rate: int, n_slot: int, n_quota: int, queued: bool) -> AdmitLayout:
    return AdmitLayout(n_rate, n_slot, n_quota, queued)


def decode_admit(
    reply: object, lease_id: str, n_rate: int, n_slot: int, queued: bool = False,
    n_quota: int = 0, keys: Sequence[str] = (),
) -> AdmitResult:
    """Turn admit.lua's reply into an AdmitResult, refusing a reply meant for another call
    (a connection one reply out of step would otherwise hand out someone else's answer).
    `queued`: the call carried a QueueSpot, so the reply ends with (queued, arrival); `keys`:
    the call's KEYS (shadow refusals come back as positions in them)."""
    return admit_layout(n_rate, n_slot, n_quota, queued).decode(reply, lease_id, keys)


# Markers that stand for the lease id, "now" and the cost in a packed admit.lua call.
ADMIT_HOLES = ("\x00lease\x00", "\x00now\x00", "\x00cost\x00")


class AdmitShape:
    """What every admit.lua call into one set of buckets shares: its KEYS (those of a call with
    no QueueSpot: a queued call's add the queues after them), its reply layouts, and (set by the
    store, when its transport packs) the whole EVALSHA packed once with the lease id, "now" and
    the cost left open (ADMIT_HOLES). Built once per plan's buckets, from admit_call itself."""

    __slots__ = ("rates", "slots", "quotas", "keys", "slot_keys", "layout", "queued_layout", "command",
                 "common_command")

    def __init__(self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket],
                 quotas: Sequence[QuotaBucket]) -> None:
        self.rates, self.slots, self.quotas = rates, slots, quotas
        self.keys = admit_call(rates, slots, "", "", "", None, quotas)[0] if rates or slots or quotas else []
        tags = set(map(hash_tag, self.keys[: len(rates) + len(quotas) + len(slots)]))
        if len(tags) > 1:
            # One script call touches one hash slot (Redis Cluster); a bug in key naming
            # must not reach Redis, where it would fail the whole pipelined batch.
            raise ValueError(f"admission keys span several hash tags: {sorted(tags)}")
        self.slot_keys = tuple(slot.key for slot in slots)
        self.layout = admit_layout(len(rates), len(slots), len(quotas), False)
        self.queued_layout = admit_layout(len(rates), len(slots), len(quotas), True)
        self.command: bytes | None = None
        self.common_command: bytes | None = None  # the same with "now" "" and cost 1: the lease id open

    def admit_call(self, lease_id: str, lease_ms: str, now: str, queue: QueueSpot | None = None,
             cost: int = 1) -> tuple[list[str], list[str | int]]:
        return admit_call(self.rates, self.slots, lease_id, lease_ms, now, queue, self.quotas, cost)

    def holed_call(self, lease_ms: str, now: str = ADMIT_HOLES[1], cost: int | str = ADMIT_HOLES[2],
                   ) -> tuple[list[str], list[str | int]]:
        """The call with ADMIT_HOLES in place of the lease id (and of "now" and the cost)."""
        return admit_call(self.rates, self.slots, ADMIT_HOLES[0], lease_ms, now, None, self.quotas, cost)  # type: ignore[arg-type]


# Units one admin call may grant (bounded: a typo must not overflow a Lua double's integers).
MAX_GRANT = 10**12


def check_grant(grant: int) -> None:
    if isinstance(grant, bool) or not isinstance(grant, int) or not 0 <= grant <= MAX_GRANT:
        raise ValueError(f"grant must be an integer in 0..{MAX_GRANT}")


def decode_quota(reply: object) -> QuotaUsage:
    """quota.lua's (and usage.lua's per quota) {used, granted, reset_ms}."""
    if isinstance(reply, BaseException):
        raise StoreError(f"quota script failed: {reply!r}") from reply
    if not isinstance(reply, list) or len(reply) != 3:
        raise StoreError(f"malformed quota reply: {reply!r:.200}")
    try:
        used, granted, reset_ms = map(int, reply)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"malformed quota reply: {reply!r:.200}") from exc
    return QuotaUsage(used, granted, reset_ms)


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
