"""An admitted request's limit headers as one pre-encoded block (gateway/trusted_headers.py).

Most responses are admitted ones, and for a plan with at most one rate and one slot bucket
(the common shape) their limit headers differ from one response to the next only in four
numbers. So, once per compiled plan, the header lines become one bytes template whose fixed
parts (names, limits, policy names) pass `trusted_headers.encode`'s check once; per request
only the numbers are formatted into it, and the block goes to the server unchecked. Checking
the joined headers on every response cost ~30,000 instructions (a regex over ~360 bytes),
more than formatting them. Refusals and other plan shapes get `LimitHeaders`' list.
The bytes are the same either way (tests/unit/test_header_block.py).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from gateway import trusted_headers
from gateway.admission.buckets import AdmissionPlan
from gateway.admission.headers import LimitHeaders
from gateway.proxy.settlement import CostPolicy
from gateway.store.base import ONE, AdmitResult, Charge
from gateway.trusted_headers import EncodedHeaders

# The template's numbers, by name (bytes formatting with a mapping takes bytes keys).
_LEFT, _CURRENT, _REMAINING, _RESET, _COST = b"left", b"current", b"remaining", b"reset", b"cost"

Lines = list[tuple[bytes, bytes]]


def _fixed(text: bytes) -> bytes:
    """Config text inside a %-template: a `%` in a policy name stays a `%`."""
    return text.replace(b"%", b"%%")


def described_buckets(plan: AdmissionPlan) -> tuple[int | None, int | None] | None:
    """The indices of the plan's one described (not shadow) rate bucket and slot bucket, each
    None when it has none: the shapes a template covers. None for any other shape (more than
    one described bucket of a kind, a quota). Shadow limits are never described, so they may
    be anywhere."""
    if plan.quota_info:
        return None
    rates = [index for index, info in enumerate(plan.rate_info) if not info.shadow]
    slots = [index for index, info in enumerate(plan.slot_info) if not info.shadow]
    if len(rates) > 1 or len(slots) > 1:
        return None
    return (rates[0] if rates else None), (slots[0] if slots else None)


def _admitted_lines(plan: AdmissionPlan, families: Collection[str], policy: bytes | None) -> Lines | None:
    """The (name, value template) pairs `LimitHeaders` gives an admitted request, numbers as
    `%(left)d`, `%(current)d`, `%(remaining)d`, `%(reset)d`; None when the plan has another
    shape (see `described_buckets`)."""
    described = described_buckets(plan)
    if described is None:
        return None
    rate = None if described[0] is None else plan.rate_info[described[0]]
    slot = None if described[1] is None else plan.slot_info[described[1]]
    lines: Lines = []
    if slot is not None:
        limit = b"%d" % slot.limit
        if "concurrency" in families:
            lines += [(b"concurrency-limit", limit), (b"concurrency-remaining", b"%(left)d")]
        if "x-concurrent" in families:
            lines += [(b"x-concurrent-limit", limit), (b"x-concurrent-current", b"%(current)d"),
                      (b"x-concurrent-remaining", b"%(left)d")]
    if rate is not None and "x-ratelimit" in families:
        lines += [(b"x-ratelimit-limit", b"%d" % rate.limit), (b"x-ratelimit-remaining", b"%(remaining)d"),
                  (b"x-ratelimit-reset", b"%(reset)d")]
    if policy is not None and "ietf" in families:
        items = []  # rate item first, as LimitHeaders
        if rate is not None:
            items.append(_fixed(f'"{rate.policy}";r='.encode()) + b"%(remaining)d;t=%(reset)d")
        if slot is not None:
            items.append(_fixed(f'"{slot.policy}";r='.encode()) + b"%(left)d")
        lines += [(b"ratelimit-policy", _fixed(policy)), (b"ratelimit", b", ".join(items))]
    return lines


def _template(lines: Lines | None) -> bytes | None:
    """`lines` as one `name: value\\r\\n` %-template, or None (no lines, or a fixed part that
    would not pass the block check)."""
    if not lines:
        return None
    template = b"".join(b"%s: %s\r\n" % (_fixed(name), value) for name, value in lines)
    # Only digits vary between requests: if one filling passes the check, every filling does.
    numbers = {_LEFT: 0, _CURRENT: 0, _REMAINING: 0, _RESET: 0, _COST: 0}
    sample = trusted_headers.encode([(name, value % numbers) for name, value in lines])
    if sample is None or sample != template % numbers:
        return None
    return template


def admitted_template(plan: AdmissionPlan, families: Collection[str], policy: bytes | None) -> bytes | None:
    """The `name: value\\r\\n` lines `LimitHeaders` gives an admitted request as one %-template
    (see `_admitted_lines`); None when the plan has another shape, no header is on, or a fixed
    part would not pass the block check."""
    return _template(_admitted_lines(plan, families, policy))


def charged_template(
    plan: AdmissionPlan, families: Collection[str], policy: bytes | None, cost: CostPolicy
) -> bytes | None:
    """`admitted_template` followed by the charge line (`cost.response: %(cost)d`), for a flat
    cost policy: its charge is the price whatever the upstream answers, so the line is known
    at admission. None for any other policy or plan shape."""
    lines = _admitted_lines(plan, families, policy)
    if lines is None or not cost.flat:
        return None
    return _template([*lines, (cost.response, b"%(cost)d")])


# Every header name `limit_headers` gives.
_NAMES = (b"concurrency-limit", b"concurrency-remaining", b"x-concurrent-limit", b"x-concurrent-current",
          b"x-concurrent-remaining", b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset",
          b"ratelimit-policy", b"ratelimit")
# What the values add to the plan's texts: numbers and the IETF items' syntax.
_SYNTAX = b'"name";q=0123456789;w=-1, "name";r=2;t=3'


def fixed_parts_pass(plan: AdmissionPlan, policy: bytes | None) -> bool:
    """Whether every part of the plan's limit headers that is not a number passes the block
    check: the header names, the policy names, the RateLimit-Policy fixed part. The check is
    per line and its value part is a class of bytes, so then any headers `limit_headers` makes
    for this plan pass it too, whatever its shape (quotas, shadows, several buckets of a kind)."""
    texts = [info.policy.encode() for info in (*plan.rate_info, *plan.slot_info, *plan.quota_info)]
    sample = [(name, _SYNTAX) for name in _NAMES] + [(b"ratelimit", text) for text in (*texts, policy or b"")]
    return trusted_headers.encode(sample) is not None


class EncodedLimitHeaders:
    """A compiled plan's limit headers from one admission result: an admitted request's as an
    `EncodedHeaders` block (from the plan's template when it has one, else joined from
    `LimitHeaders`' list), a refused one's as `LimitHeaders` makes them. With a flat cost policy,
    `charged` gives an admitted request's with its charge line."""

    __slots__ = ("_headers", "_template", "_charged_template", "_cost", "_checked", "_rate_index", "_slot_index",
                 "_rate_limit", "_slot_limit", "_rate_counts_cost")

    def __init__(
        self, plan: AdmissionPlan, families: Collection[str], policy: bytes | None, cost: CostPolicy | None = None
    ) -> None:
        self._headers = LimitHeaders(plan, families, policy)
        self._template = admitted_template(plan, families, policy)
        self._cost = cost
        self._charged_template = None if cost is None else charged_template(plan, families, policy, cost)
        self._checked = fixed_parts_pass(plan, policy)
        # The template's buckets (limits None when the plan has no such described bucket).
        rate_index, slot_index = described_buckets(plan) or (None, None)
        self._rate_index = rate_index or 0
        self._slot_index = slot_index or 0
        rate = None if rate_index is None else plan.rate_info[rate_index]
        self._rate_limit = None if rate is None else rate.limit
        self._slot_limit = None if slot_index is None else plan.slot_info[slot_index].limit
        self._rate_counts_cost = rate is not None and rate.counts_cost

    def __call__(self, result: AdmitResult, charge: Charge = ONE) -> Sequence[tuple[bytes, bytes]]:
        template = self._template
        if template is not None and result.admitted:
            return EncodedHeaders(template % self._numbers(result, charge))
        headers = self._headers(result, charge)
        if headers and self._checked and result.admitted:
            # Any other shape: `LimitHeaders`' own list, joined as `trusted_headers.encode` joins
            # it, without its check per response (`fixed_parts_pass`).
            return EncodedHeaders(b"\r\n".join(map(b": ".join, headers)) + b"\r\n")
        return headers

    def charged(self, result: AdmitResult | None, charge: Charge) -> Sequence[tuple[bytes, bytes]]:
        """An admitted request's headers (limits, if it has a result, then the charge line) under
        the flat cost policy this was built with: the bytes `CostPolicy.with_header` gives the
        limit headers and `charge.cost`, as one block when the plan has a template."""
        template = self._charged_template
        if template is None or result is None or not result.admitted:
            cost = self._cost
            assert cost is not None and cost.flat, "charged() is for a flat cost policy"
            return cost.with_header(self(result, charge) if result is not None else [], charge.cost)
        return EncodedHeaders(template % self._numbers(result, charge))

    def _numbers(self, result: AdmitResult, charge: Charge) -> dict[bytes, int]:
        """The numbers of an admitted request's templates (a template ignores those it lacks).
        Clamped by comparisons: builtin min() and max() parse keywords on every call (~400
        instructions each against ~20)."""
        left = current = remaining = reset = 0
        limit = self._slot_limit
        if limit is not None:
            current = result.slot_counts[self._slot_index] + charge.slots  # this request's slots included
            if current > limit:
                current = limit
            left = limit - current
        limit = self._rate_limit
        if limit is not None:
            index = self._rate_index
            remaining = limit - result.rate_counts[index] - (charge.cost if self._rate_counts_cost else 1)
            if remaining < 0:
                remaining = 0
            reset = math.ceil(result.rate_reset_ms[index] / 1000)
            if reset < 0:
                reset = 0
        return {_LEFT: left, _CURRENT: current, _REMAINING: remaining, _RESET: reset, _COST: charge.cost}
