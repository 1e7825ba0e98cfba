"""Limit headers (SPEC §4) from one admission decision. Pure.

Concurrency families describe the slot bucket with the fewest free slots, rate families the
rate bucket with the fewest remaining requests; on a 429 the bucket that refused wins ties,
so the numbers describe the state that caused it. `in_flight` counts this request only when
it was admitted (a refused request holds no slot): 10 slots with 2 already held gives
Concurrency-Remaining 7 on an admission, 8 on a rate refusal.

A refusal answered from the refusal cache (`result.from_cache`, gateway/admission/controller.py)
knows only its refusing rate limits (full until their `t`): the concurrency families, the IETF
concurrency items and the IETF items of rate limits that did not refuse are left out rather
than repeated stale.
IETF `w` is whole seconds (the draft's unit): a sub-second-fraction window is rounded up, so
`5/1500ms` is announced as `q=5;w=2`, never a rate above the real one.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from gateway.admission.buckets import AdmissionPlan
from gateway.store.base import AdmitResult

Headers = list[tuple[bytes, bytes]]


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def _window(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"


def ietf_window(seconds: float) -> int:
    """The IETF `w` parameter: whole seconds, rounded up (at least 1)."""
    return max(1, math.ceil(seconds))


def policy_header(plan: AdmissionPlan) -> bytes | None:
    """RateLimit-Policy: fixed per (plan, route), so computed once and cached with the plan."""
    items = [f'"{info.policy}";q={info.limit};w={ietf_window(info.window)}' for info in plan.rate_info]
    items += [f'"{info.policy}";q={info.limit};qu="concurrent-requests"' for info in plan.slot_info]
    return ", ".join(items).encode() if items else None


def rate_state(plan: AdmissionPlan, result: AdmitResult) -> list[tuple[int, int]]:
    """(remaining after this request, ms until one more frees up) per rate bucket."""
    states = []
    for info, count, reset_ms in zip(plan.rate_info, result.rate_counts, result.rate_reset_ms, strict=True):
        used = count + 1 if result.admitted else count
        remaining = max(0, info.limit - used)
        if not result.admitted and remaining == 0:
            reset_ms = max(reset_ms, result.retry_after_ms)  # Retry-After is never earlier than t
        states.append((remaining, reset_ms))
    return states


def slots_known(plan: AdmissionPlan, result: AdmitResult) -> bool:
    """False for a cached refusal: it carries no slot counts (they change every moment)."""
    return not result.from_cache and len(result.slot_counts) == len(plan.slot_info)


def slot_in_flight(plan: AdmissionPlan, result: AdmitResult) -> list[int]:
    """Requests in flight per slot bucket, this request included only if admitted (capped at
    the limit); empty when the result knows nothing about the slots."""
    if not slots_known(plan, result):
        return []
    extra = 1 if result.admitted else 0
    return [min(info.limit, count + extra) for info, count in zip(plan.slot_info, result.slot_counts, strict=True)]


def limit_headers(
    plan: AdmissionPlan,
    result: AdmitResult,
    families: Collection[str],
    policy: bytes | None,
) -> Headers:
    headers: Headers = []
    in_flight = slot_in_flight(plan, result)
    if in_flight:
        i = min(range(len(in_flight)), key=lambda j: plan.slot_info[j].limit - in_flight[j])
        limit = plan.slot_info[i].limit
        current = in_flight[i]
        if "concurrency" in families:
            headers.append((b"concurrency-limit", b"%d" % limit))
            headers.append((b"concurrency-remaining", b"%d" % (limit - current)))
        if "x-concurrent" in families:
            headers.append((b"x-concurrent-limit", b"%d" % limit))
            headers.append((b"x-concurrent-current", b"%d" % current))
            headers.append((b"x-concurrent-remaining", b"%d" % (limit - current)))
    rates = rate_state(plan, result)
    if rates and "x-ratelimit" in families:
        i = min(range(len(rates)), key=lambda j: (rates[j][0], -rates[j][1]))
        headers.append((b"x-ratelimit-limit", b"%d" % plan.rate_info[i].limit))
        headers.append((b"x-ratelimit-remaining", b"%d" % rates[i][0]))
        headers.append((b"x-ratelimit-reset", b"%d" % _seconds(rates[i][1])))
    if policy is not None and "ietf" in families:
        items = [
            f'"{info.policy}";r={remaining};t={_seconds(reset_ms)}'
            for info, (remaining, reset_ms) in zip(plan.rate_info, rates, strict=True)
            if remaining == 0 or not result.from_cache  # a cached refusal knows its full limits only
        ]
        items += [
            f'"{info.policy}";r={info.limit - current}' for info, current in zip(plan.slot_info, in_flight)
        ]
        headers.append((b"ratelimit-policy", policy))
        if items:
            headers.append((b"ratelimit", ", ".join(items).encode()))
    return headers


class LimitHeaders:
    """`limit_headers` for one (plan, families, policy), with everything fixed done once.

    Built with the compiled plan (gateway/runtime.py). Plans with at most one rate bucket and at
    most one slot bucket (the common shape) take a fast path that only formats the numbers;
    any other shape uses `limit_headers` itself. Both give byte-identical headers.
    """

    __slots__ = ("_plan", "_families", "_policy", "_simple", "_rate_limit", "_slot_limit", "_rate_limit_text",
                 "_slot_limit_text", "_concurrency", "_x_concurrent", "_x_ratelimit", "_ietf", "_rate_item",
                 "_slot_item")

    def __init__(self, plan: AdmissionPlan, families: Collection[str], policy: bytes | None) -> None:
        self._plan = plan
        self._families = families
        self._policy = policy or b""
        self._simple = len(plan.rate_info) <= 1 and len(plan.slot_info) <= 1
        # The single bucket's limit of each kind, None when the plan has no bucket of that kind.
        self._rate_limit = plan.rate_info[0].limit if plan.rate_info else None
        self._slot_limit = plan.slot_info[0].limit if plan.slot_info else None
        self._rate_limit_text = b"%d" % (self._rate_limit or 0)
        self._slot_limit_text = b"%d" % (self._slot_limit or 0)
        self._concurrency = "concurrency" in families
        self._x_concurrent = "x-concurrent" in families
        self._x_ratelimit = "x-ratelimit" in families
        self._ietf = policy is not None and "ietf" in families
        # The fixed start of each IETF `RateLimit` item; only the numbers follow.
        self._rate_item = f'"{plan.rate_info[0].policy}";r='.encode() if plan.rate_info else b""
        self._slot_item = f'"{plan.slot_info[0].policy}";r='.encode() if plan.slot_info else b""

    def __call__(self, result: AdmitResult) -> Headers:
        if not self._simple:
            return limit_headers(self._plan, result, self._families, self._policy or None)
        headers: Headers = []
        slot_item = None
        if self._slot_limit is not None and not result.from_cache and result.slot_counts:
            slot_item = self._add_slot(headers, result, self._slot_limit)
        rate_item = None if self._rate_limit is None else self._add_rate(headers, result, self._rate_limit)
        if self._ietf:
            items = [item for item in (rate_item, slot_item) if item is not None]  # rate items first
            headers.append((b"ratelimit-policy", self._policy))
            if items:
                headers.append((b"ratelimit", b", ".join(items)))
        return headers

    def _add_slot(self, headers: Headers, result: AdmitResult, limit: int) -> bytes:
        """The concurrency families' headers; returns the slot bucket's IETF item."""
        current = min(limit, result.slot_counts[0] + 1 if result.admitted else result.slot_counts[0])
        left = b"%d" % (limit - current)
        if self._concurrency:
            headers.append((b"concurrency-limit", self._slot_limit_text))
            headers.append((b"concurrency-remaining", left))
        if self._x_concurrent:
            headers.append((b"x-concurrent-limit", self._slot_limit_text))
            headers.append((b"x-concurrent-current", b"%d" % current))
            headers.append((b"x-concurrent-remaining", left))
        return self._slot_item + left

    def _add_rate(self, headers: Headers, result: AdmitResult, limit: int) -> bytes | None:
        """The X-RateLimit headers (numbers as `rate_state` computes them); returns the rate bucket's IETF item."""
        count = result.rate_counts[0]
        remaining = max(0, limit - (count + 1 if result.admitted else count))
        reset_ms = result.rate_reset_ms[0]
        if not result.admitted and remaining == 0:
            reset_ms = max(reset_ms, result.retry_after_ms)  # Retry-After is never earlier than t
        reset = _seconds(reset_ms)
        if self._x_ratelimit:
            headers.append((b"x-ratelimit-limit", self._rate_limit_text))
            headers.append((b"x-ratelimit-remaining", b"%d" % remaining))
            headers.append((b"x-ratelimit-reset", b"%d" % reset))
        if result.from_cache and remaining:  # not the refusing limit: its number may be stale
            return None
        return self._rate_item + b"%d;t=%d" % (remaining, reset)


# A concurrency 429's Retry-After: a slot can free any moment, so the shortest honest wait
# (as the providers send). The ban rule (bans.concurrency_grace) only asks for 0.5 s of it.
CONCURRENCY_RETRY_AFTER = 1


def retry_after_seconds(result: AdmitResult) -> int:
    """Whole seconds (ceiling, at least 1) until a rate-refused request would be admitted."""
    return max(1, _seconds(result.retry_after_ms))


def human_window(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{_window(seconds)}s"


def refusal_message(plan: AdmissionPlan, result: AdmitResult) -> str:
    """The human sentence of a 429, naming the limit that refused."""
    if result.reason == "rate":
        states = rate_state(plan, result)
        i = next((j for j, (remaining, _) in enumerate(states) if remaining == 0), 0)
        info = plan.rate_info[i]
        return f"You have exceeded {info.limit} requests per {human_window(info.window)} on the {plan.plan} plan."
    in_flight = slot_in_flight(plan, result)
    i = next((j for j, info in enumerate(plan.slot_info) if in_flight[j] >= info.limit), 0)
    info = plan.slot_info[i]
    return f"All {info.limit} concurrent request slots of the {plan.plan} plan are in use."
