"""A key's buckets and their usage, as the usage path and the admin key view report them.

`key_buckets` lists every bucket a key's requests use, once each (per-route buckets once per
route), from the compiled plans; `usage_of` reads their counts in one store call (`usage`).

The usage path (`usage_path`, GET) answers a caller about its own key. A client hammering it
must not cost a store call each: `UsageAnswers` keeps each key's answer for `USAGE_TTL`
(1 s; the numbers may be that old) and lets concurrent callers of one key share one store call.
At most `max_entries` keys are kept (the oldest go first).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from gateway.admission.buckets import BucketInfo
from gateway.config.model import Key
from gateway.runtime import Routing
from gateway.store.base import QuotaBucket, QuotaUsage, RateBucket, SlotBucket, StoreError
from gateway.store.jobs import JobStore, Usage

USAGE_TTL = 1.0


@dataclass(slots=True)
class Bucket:
    """One bucket of a key, the routes whose requests use it, and its usage once read."""

    bucket: RateBucket | SlotBucket | QuotaBucket
    info: BucketInfo
    routes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class KeyBuckets:
    rates: list[Bucket]
    slots: list[Bucket]
    quotas: list[Bucket]


def key_buckets(routing: Routing, key: Key) -> KeyBuckets:
    rates: dict[str, Bucket] = {}
    slots: dict[str, Bucket] = {}
    quotas: dict[str, Bucket] = {}
    for index, route in enumerate(routing.config.routes):
        plan = routing.plan_for(key, index, route).plan
        for found, buckets, infos in ((rates, plan.rates, plan.rate_info), (slots, plan.slots, plan.slot_info),
                                      (quotas, plan.quotas, plan.quota_info)):
            for bucket, info in zip(buckets, infos, strict=True):
                found.setdefault(bucket.key, Bucket(bucket, info)).routes.append(route.path)
    return KeyBuckets(list(rates.values()), list(slots.values()), list(quotas.values()))


async def usage_of(store: JobStore, buckets: KeyBuckets) -> Usage:
    """The buckets' counts in one store call. Raises StoreError."""
    rates = [cast(RateBucket, b.bucket) for b in buckets.rates]
    slots = [cast(SlotBucket, b.bucket) for b in buckets.slots]
    quotas = [cast(QuotaBucket, b.bucket) for b in buckets.quotas]
    return await store.usage(rates, slots, quotas)


def quota_usages(usage: Usage, count: int) -> list[QuotaUsage]:
    """The usage of each of `count` quotas (a store answer of another length is a bug: StoreError)."""
    if len(usage.quotas) != count:
        raise StoreError(f"usage answered {len(usage.quotas)} quotas for {count}")
    return usage.quotas


def _number(seconds: float) -> int | float:
    return int(seconds) if seconds == int(seconds) else seconds


def usage_document(key: Key, buckets: KeyBuckets, usage: Usage) -> dict[str, Any]:
    """The usage path's JSON: every limit the key's requests count against (shadow limits
    left out, as from the headers), with what is used and left now. A rate limit's `reset` is
    an upper bound (its window: by then everything counted now has left it)."""
    limits: list[dict[str, Any]] = []
    for n, item in enumerate(buckets.rates):
        info = item.info
        if info.shadow:
            continue
        used = usage.rate_counts[n]
        limits.append({
            "name": info.policy, "kind": "rate", "limit": info.limit, "window": _number(info.window),
            "counts": "cost" if info.counts_cost else "requests", "used": used,
            "remaining": max(0, info.limit - used), "reset": _number(info.window) if used else 0,
        })
    for n, item in enumerate(buckets.slots):
        info = item.info
        if info.shadow:
            continue
        used = usage.slot_counts[n]
        limits.append({
            "name": info.policy, "kind": "concurrency", "limit": info.limit, "counts": "slots", "used": used,
            "remaining": max(0, info.limit - used), "reset": 0,
        })
    for item, quota in zip(buckets.quotas, quota_usages(usage, len(buckets.quotas)), strict=True):
        info = item.info
        if info.shadow:
            continue
        limits.append({
            "name": info.policy, "kind": "quota", "limit": info.limit, "period": info.period,
            "counts": "cost" if info.counts_cost else "requests", "used": quota.used, "granted": quota.granted,
            "remaining": max(0, info.limit + quota.granted - quota.used), "reset": -(-quota.reset_ms // 1000),
        })
    return {"key": key.id, "plan": key.plan, "limits": limits}


@dataclass(slots=True)
class _Answer:
    routing: Routing  # the config it was made with: a reload starts afresh
    expires: float
    body: asyncio.Future[bytes]


class UsageAnswers:
    """The usage path's answers, per key, for `ttl` seconds (see the module docstring)."""

    def __init__(self, ttl: float = USAGE_TTL, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._max_entries = max_entries
        self._answers: dict[str, _Answer] = {}

    async def body(self, routing: Routing, key: Key, store: JobStore) -> bytes:
        """The JSON body for `key`. Raises StoreError (not cached) when the store fails."""
        now = self.clock()
        answer = self._answers.get(key.id)
        if answer is None or answer.routing is not routing or now >= answer.expires:
            if len(self._answers) >= self._max_entries:
                self._make_room(now)
            future: asyncio.Future[bytes] = asyncio.ensure_future(self._read(routing, key, store))
            answer = self._answers[key.id] = _Answer(routing, now + self.ttl, future)
            future.add_done_callback(lambda done: self._forget_failure(key.id, answer, done))
        return await asyncio.shield(answer.body)  # one caller leaving does not cancel the others' read

    async def _read(self, routing: Routing, key: Key, store: JobStore) -> bytes:
        buckets = key_buckets(routing, key)
        usage = await usage_of(store, buckets)
        return json.dumps(usage_document(key, buckets, usage), separators=(",", ":")).encode()

    def _forget_failure(self, key_id: str, answer: _Answer, done: asyncio.Future[bytes]) -> None:
        if (done.cancelled() or done.exception() is not None) and self._answers.get(key_id) is answer:
            del self._answers[key_id]

    def _make_room(self, now: float) -> None:
        live = {k: a for k, a in self._answers.items() if a.expires > now}
        if len(live) >= self._max_entries:
            live = dict(list(live.items())[len(live) // 4:])
        self._answers = live
