"""Limit headers (SPEC §4) from one admission decision. Pure.

Concurrency families describe the slot bucket with the fewest free slots, rate families the
rate bucket with the fewest remaining requests; on a 429 the bucket that refused wins ties,
so the numbers describe the state that caused it. `in_flight` counts this request:
10 slots with 2 already held gives Concurrency-Remaining 7.
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


def policy_header(plan: AdmissionPlan) -> bytes | None:
    """RateLimit-Policy: fixed per (plan, route), so computed once and cached with the plan."""
    items = [f'"{info.policy}";q={info.limit};w={_window(info.window)}' for info in plan.rate_info]
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


def slot_in_flight(plan: AdmissionPlan, result: AdmitResult) -> list[int]:
    """Requests in flight per slot bucket, this request included (capped at the limit)."""
    return [min(info.limit, count + 1) for info, count in zip(plan.slot_info, result.slot_counts, strict=True)]


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
        ]
        items += [
            f'"{info.policy}";r={info.limit - current}' for info, current in zip(plan.slot_info, in_flight, strict=True)
        ]
        headers.append((b"ratelimit-policy", policy))
        headers.append((b"ratelimit", ", ".join(items).encode()))
    return headers


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
