"""Limit headers (SPEC §4) from one admission decision. Pure.

Concurrency families describe the slot bucket with the fewest free slots, rate families the
rate bucket with the fewest remaining requests; on a 429 the bucket that refused wins ties,
so the numbers describe the state that caused it. `in_flight` counts this request only when
it was admitted (a refused request holds no slot): 10 slots with 2 already held gives
Concurrency-Remaining 7 on an admission, 8 on a rate refusal.

Cost (issue 18): a limit that counts cost is described in units (its remaining drops by the
request's cost when admitted), concurrency in slots (a request holding K slots takes K). Quotas
join the IETF headers (`"credits";q=N;w=<seconds of the current period>`, `r=..;t=<seconds to
the period's end>`) and are candidates for the X-RateLimit family. A bucket "refused" this
request when fewer than its units were left. Shadow limits are never described.

A refusal answered from the refusal cache (`result.from_cache`, gateway/admission/controller.py)
knows only its refusing limits (full until their `t`): the concurrency families, the IETF
concurrency items and the IETF items of limits that did not refuse are left out rather than
repeated stale.
IETF `w` is whole seconds (the draft's unit): a sub-second-fraction window is rounded up, so
`5/1500ms` is announced as `q=5;w=2`, never a rate above the real one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.store import periods
from gateway.store.base import ONE, AdmitResult, Charge

Headers = list[tuple[bytes, bytes]]


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def _window(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"


def ietf_window(seconds: float) -> int:
    """The IETF `w` parameter: whole seconds, rounded up (at least 1)."""
    return max(1, math.ceil(seconds))


def policy_header(plan: AdmissionPlan) -> bytes | None:
    """RateLimit-Policy's fixed part, cached with the plan: the rate and concurrency items (a
    quota's `w` follows the calendar: `quota_policy` adds its items per response). b"" for a
    plan with quotas only, None when no limit is described."""
    items = [f'"{info.policy}";q={info.limit};w={ietf_window(info.window)}' for info in plan.rate_info
             if not info.shadow]
    items += [f'"{info.policy}";q={info.limit};qu="concurrent-requests"' for info in plan.slot_info
              if not info.shadow]
    if items:
        return ", ".join(items).encode()
    return b"" if any(not info.shadow for info in plan.quota_info) else None


def period_seconds(period: str, wall_ms: float) -> int:
    """The length of the UTC period (`1d`, `7d`, `month`) that holds the wall-clock instant
    `wall_ms` (a result's `now_ms` may be a store's monotonic clock: not used here)."""
    return periods.period_of(wall_ms, period)[2] // 1000


def quota_policy(plan: AdmissionPlan, wall_ms: float | None = None) -> list[str]:
    """The quotas' RateLimit-Policy items (`w`: the current period's seconds)."""
    now = time.time() * 1000 if wall_ms is None else wall_ms
    return [f'"{info.policy}";q={info.limit};w={period_seconds(info.period, now)}'
            for info in plan.quota_info if not info.shadow]


def units(info: BucketInfo, charge: Charge) -> int:
    """What one request takes from a rate bucket or quota: its cost, or 1 if it counts requests."""
    return charge.cost if info.counts_cost else 1


def _state(
    info: BucketInfo, count: int, reset_ms: int, result: AdmitResult, charge: Charge, granted: int = 0
) -> tuple[int, int]:
    needed = units(info, charge)
    used = count + needed if result.admitted else count
    remaining = max(0, info.limit + granted - used)  # a quota's grants for the period add to it
    if not result.admitted and remaining < needed:
        reset_ms = max(reset_ms, result.retry_after_ms)  # Retry-After is never earlier than t
    return remaining, reset_ms


def rate_state(plan: AdmissionPlan, result: AdmitResult, charge: Charge = ONE) -> list[tuple[int, int]]:
    """(remaining after this request, ms until it frees up) per rate bucket, in its units."""
    return [_state(info, count, reset_ms, result, charge)
            for info, count, reset_ms in zip(plan.rate_info, result.rate_counts, result.rate_reset_ms, strict=True)]


def quota_state(plan: AdmissionPlan, result: AdmitResult, charge: Charge = ONE) -> list[tuple[int, int]]:
    """As `rate_state` per quota (reset: the period's end); empty when the result has none."""
    if len(result.quota_counts) != len(plan.quota_info):
        return []
    granted = result.quota_granted if len(result.quota_granted) == len(plan.quota_info) else [0] * len(plan.quota_info)
    return [_state(info, count, reset_ms, result, charge, extra)
            for info, count, reset_ms, extra in zip(
                plan.quota_info, result.quota_counts, result.quota_reset_ms, granted, strict=True)]


def slots_known(plan: AdmissionPlan, result: AdmitResult) -> bool:
    """False for a cached refusal: it carries no slot counts (they change every moment)."""
    return not result.from_cache and len(result.slot_counts) == len(plan.slot_info)


def slot_in_flight(plan: AdmissionPlan, result: AdmitResult, charge: Charge = ONE) -> list[int]:
    """Slots held per slot bucket, this request's `charge.slots` included only if admitted
    (capped at the limit); empty when the result knows nothing about the slots."""
    if not slots_known(plan, result):
        return []
    extra = charge.slots if result.admitted else 0
    return [min(info.limit, count + extra) for info, count in zip(plan.slot_info, result.slot_counts, strict=True)]


def limit_headers(
    plan: AdmissionPlan,
    result: AdmitResult,
    families: Collection[str],
    policy: bytes | None,
    charge: Charge = ONE,
) -> Headers:
    headers: Headers = []
    in_flight = slot_in_flight(plan, result, charge)
    slots = [(info, current) for info, current in zip(plan.slot_info, in_flight, strict=False) if not info.shadow]
    if slots:
        limit, current = min(((info.limit, current) for info, current in slots), key=lambda s: s[0] - s[1])
        if "concurrency" in families:
            headers.append((b"concurrency-limit", b"%d" % limit))
            headers.append((b"concurrency-remaining", b"%d" % (limit - current)))
        if "x-concurrent" in families:
            headers.append((b"x-concurrent-limit", b"%d" % limit))
            headers.append((b"x-concurrent-current", b"%d" % current))
            headers.append((b"x-concurrent-remaining", b"%d" % (limit - current)))
    # (info, remaining, reset_ms) of every limit counted over time: rates, then quotas
    counted = [(info, *state) for info, state in zip(plan.rate_info, rate_state(plan, result, charge), strict=False)
               if not info.shadow]
    quotas = [(info, *state) for info, state in zip(plan.quota_info, quota_state(plan, result, charge), strict=False)
              if not info.shadow]
    if (counted or quotas) and "x-ratelimit" in families:
        info, remaining, reset_ms = min(counted + quotas, key=lambda c: (c[1], -c[2]))
        headers.append((b"x-ratelimit-limit", b"%d" % info.limit))
        headers.append((b"x-ratelimit-remaining", b"%d" % remaining))
        headers.append((b"x-ratelimit-reset", b"%d" % _seconds(reset_ms)))
    if policy is not None and "ietf" in families:
        # a cached refusal knows its refusing limits only (those with fewer units left than asked)
        items = [f'"{info.policy}";r={remaining};t={_seconds(reset_ms)}' for info, remaining, reset_ms in counted
                 if remaining < units(info, charge) or not result.from_cache]
        items += [f'"{info.policy}";r={info.limit - current}' for info, current in slots]
        items += [f'"{info.policy}";r={remaining};t={_seconds(reset_ms)}' for info, remaining, reset_ms in quotas
                  if remaining < units(info, charge) or not result.from_cache]
        if plan.quota_info:
            policy = b", ".join([part for part in (policy,) if part] + [i.encode() for i in quota_policy(plan)])
        headers.append((b"ratelimit-policy", policy))
        if items:
            headers.append((b"ratelimit", ", ".join(items).encode()))
    return headers


class LimitHeaders:
    """`limit_headers` for one (plan, families, policy), with everything fixed done once.

    Built with the compiled plan (gateway/runtime.py). Plans with at most one rate bucket and at
    most one slot bucket, no quota and no shadow limit (the common shape) take a fast path that
    only formats the numbers; any other shape uses `limit_headers` itself. Both give
    byte-identical headers.
    """

    __slots__ = ("_plan", "_families", "_policy", "_simple", "_rate_limit", "_slot_limit", "_rate_limit_text",
                 "_slot_limit_text", "_concurrency", "_x_concurrent", "_x_ratelimit", "_ietf", "_rate_item",
                 "_slot_item", "_rate_counts_cost", "_given_policy")

    def __init__(self, plan: AdmissionPlan, families: Collection[str], policy: bytes | None) -> None:
        self._plan = plan
        self._families = families
        self._policy = policy or b""
        self._given_policy = policy  # b"" (quotas only) is not None: limit_headers adds the quotas' items
        self._simple = (len(plan.rate_info) <= 1 and len(plan.slot_info) <= 1 and not plan.quota_info
                        and not any(info.shadow for info in (*plan.rate_info, *plan.slot_info)))
        self._rate_counts_cost = bool(plan.rate_info) and plan.rate_info[0].counts_cost
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

    def __call__(self, result: AdmitResult, charge: Charge = ONE) -> Headers:
        if not self._simple:
            return limit_headers(self._plan, result, self._families, self._given_policy, charge)
        headers: Headers = []
        slot_item = None
        if self._slot_limit is not None and not result.from_cache and result.slot_counts:
            slot_item = self._add_slot(headers, result, self._slot_limit, charge.slots)
        rate_item = None
        if self._rate_limit is not None:
            needed = charge.cost if self._rate_counts_cost else 1
            rate_item = self._add_rate(headers, result, self._rate_limit, needed)
        if self._ietf:
            items = [item for item in (rate_item, slot_item) if item is not None]  # rate items first
            headers.append((b"ratelimit-policy", self._policy))
            if items:
                headers.append((b"ratelimit", b", ".join(items)))
        return headers

    def _add_slot(self, headers: Headers, result: AdmitResult, limit: int, slots: int) -> bytes:
        """The concurrency families' headers; returns the slot bucket's IETF item."""
        current = min(limit, result.slot_counts[0] + slots if result.admitted else result.slot_counts[0])
        left = b"%d" % (limit - current)
        if self._concurrency:
            headers.append((b"concurrency-limit", self._slot_limit_text))
            headers.append((b"concurrency-remaining", left))
        if self._x_concurrent:
            headers.append((b"x-concurrent-limit", self._slot_limit_text))
            headers.append((b"x-concurrent-current", b"%d" % current))
            headers.append((b"x-concurrent-remaining", left))
        return self._slot_item + left

    def _add_rate(self, headers: Headers, result: AdmitResult, limit: int, needed: int) -> bytes | None:
        """The X-RateLimit headers (numbers as `rate_state` computes them); returns the rate bucket's IETF item."""
        count = result.rate_counts[0]
        remaining = max(0, limit - (count + needed if result.admitted else count))
        reset_ms = result.rate_reset_ms[0]
        if not result.admitted and remaining < needed:
            reset_ms = max(reset_ms, result.retry_after_ms)  # Retry-After is never earlier than t
        reset = _seconds(reset_ms)
        if self._x_ratelimit:
            headers.append((b"x-ratelimit-limit", self._rate_limit_text))
            headers.append((b"x-ratelimit-remaining", b"%d" % remaining))
            headers.append((b"x-ratelimit-reset", b"%d" % reset))
        if result.from_cache and remaining >= needed:  # not the refusing limit: its number may be stale
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


_PERIOD_WORDS = {"1d": "daily", "7d": "weekly", "month": "monthly"}


def refusal_message(plan: AdmissionPlan, result: AdmitResult, charge: Charge = ONE) -> str:
    """The human sentence of a refusal, naming the limit that refused."""
    if result.reason == "quota":
        states = quota_state(plan, result, charge)
        i = next((j for j, (info, (remaining, _)) in enumerate(zip(plan.quota_info, states, strict=False))
                  if not info.shadow and remaining < units(info, charge)), 0)
        info = plan.quota_info[i] if plan.quota_info else BucketInfo("quota", 0, 0.0)
        what = "units" if info.counts_cost else "requests"
        return (f"This request needs {units(info, charge)} {what}; the {_PERIOD_WORDS.get(info.period, info.period)}"
                f" quota of {info.limit} {what} of the {plan.plan} plan is spent until the period ends.")
    if result.reason == "rate":
        states = rate_state(plan, result, charge)
        i = next((j for j, (info, (remaining, _)) in enumerate(zip(plan.rate_info, states, strict=False))
                  if not info.shadow and remaining < units(info, charge)), 0)
        info = plan.rate_info[i]
        if info.counts_cost:
            if charge.cost > info.limit:
                return (f"This request costs {charge.cost} units, more than the {info.limit} units per "
                        f"{human_window(info.window)} of the {plan.plan} plan.")
            return f"You have exceeded {info.limit} units per {human_window(info.window)} on the {plan.plan} plan."
        return f"You have exceeded {info.limit} requests per {human_window(info.window)} on the {plan.plan} plan."
    in_flight = slot_in_flight(plan, result, charge)
    i = next((j for j, info in enumerate(plan.slot_info)
              if not info.shadow and in_flight and in_flight[j] + charge.slots > info.limit), 0)
    info = plan.slot_info[i]
    if charge.slots > 1:
        return (f"This request needs {charge.slots} of the {info.limit} concurrent request slots of the "
                f"{plan.plan} plan, and not enough are free.")
    return f"All {info.limit} concurrent request slots of the {plan.plan} plan are in use."
