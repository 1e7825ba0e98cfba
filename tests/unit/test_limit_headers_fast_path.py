"""`LimitHeaders` (the precomputed limit headers of one compiled plan) against `limit_headers`,
the straightforward reference: the same bytes for any plan shape, families and result."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.headers import (
    LimitHeaders,
    limit_headers,
    period_seconds,
    policy_header,
    quota_policy,
    refusal_message,
)
from gateway.store.base import AdmitResult, Charge, QuotaBucket, RateBucket, SlotBucket

FAMILIES = ("concurrency", "x-concurrent", "x-ratelimit", "ietf")
names = st.text(alphabet="abz.-_%é", min_size=1, max_size=6)
limits = st.integers(min_value=1, max_value=10_000)


@st.composite
def plans(draw: st.DrawFn) -> AdmissionPlan:
    # mostly the fast path's shapes (at most one bucket of each kind), sometimes more
    rate_count = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
    slot_count = draw(st.sampled_from([0, 1, 1, 1, 2]))
    rate_info = tuple(
        BucketInfo(draw(names), draw(limits), draw(st.sampled_from([1.0, 0.5, 60.0, 3600.0])))
        for _ in range(rate_count)
    )
    slot_info = tuple(BucketInfo(draw(names), draw(limits), 0.0) for _ in range(slot_count))
    return AdmissionPlan(
        draw(names),
        rates=tuple(RateBucket(f"r{i}", info.limit, int(info.window * 1000)) for i, info in enumerate(rate_info)),
        rate_info=rate_info,
        slots=tuple(SlotBucket(f"c{i}", info.limit) for i, info in enumerate(slot_info)),
        slot_info=slot_info,
        wait=0.0,
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[AdmissionPlan, AdmitResult, frozenset[str]]:
    plan = draw(plans())
    admitted = draw(st.booleans())
    reason = None if admitted else draw(st.sampled_from(["rate", "concurrency"]))
    counts = st.integers(min_value=0, max_value=10_050)
    result = AdmitResult(
        admitted,
        reason,
        0 if admitted else draw(st.integers(min_value=0, max_value=4_000_000)),
        rate_counts=[draw(counts) for _ in plan.rates],
        rate_reset_ms=[draw(st.integers(min_value=0, max_value=4_000_000)) for _ in plan.rates],
        slot_counts=[draw(counts) for _ in plan.slots],
    )
    if reason == "rate" and draw(st.booleans()):
        result.slot_counts = []  # a refusal from the refusal cache knows nothing of the slots ...
        result.from_cache = True  # ... nor of the rate limits that did not refuse
    families = frozenset(draw(st.sets(st.sampled_from(FAMILIES))))
    return plan, result, families


@given(cases())
def test_precomputed_headers_are_byte_identical_to_the_reference(
    case: tuple[AdmissionPlan, AdmitResult, frozenset[str]],
) -> None:
    plan, result, families = case
    policy = policy_header(plan)
    assert LimitHeaders(plan, families, policy)(result) == limit_headers(plan, result, families, policy)


def test_the_common_shape_with_every_family() -> None:
    plan = AdmissionPlan(
        "pro", rates=(RateBucket("r", 10, 60_000),), rate_info=(BucketInfo("rpm", 10, 60.0),),
        slots=(SlotBucket("c", 2),), slot_info=(BucketInfo("requests", 2, 0.0),), wait=0.0,
    )
    result = AdmitResult(False, "rate", 12_300, rate_counts=[10], rate_reset_ms=[5_000], slot_counts=[1])
    headers = LimitHeaders(plan, frozenset(FAMILIES), policy_header(plan))(result)
    assert headers == [
        (b"concurrency-limit", b"2"),
        (b"concurrency-remaining", b"1"),  # a rate refusal holds no slot: 1 of 2 in flight
        (b"x-concurrent-limit", b"2"),
        (b"x-concurrent-current", b"1"),
        (b"x-concurrent-remaining", b"1"),
        (b"x-ratelimit-limit", b"10"),
        (b"x-ratelimit-remaining", b"0"),
        (b"x-ratelimit-reset", b"13"),
        (b"ratelimit-policy", b'"rpm";q=10;w=60, "requests";q=2;qu="concurrent-requests"'),
        (b"ratelimit", b'"rpm";r=0;t=13, "requests";r=1'),
    ]


# -- issue 18: cost-counting limits, weighted slots, quotas, shadow limits -----------------------


@st.composite
def charged_cases(draw: st.DrawFn) -> tuple[AdmissionPlan, AdmitResult, frozenset[str], Charge]:
    """Plans whose limits may count cost, be shadows, or be quotas; a request of any charge."""
    base, result, families = draw(cases())
    rate_info = tuple(replace(info, counts_cost=draw(st.booleans()), shadow=draw(st.sampled_from([False] * 6 + [True])))
                      for info in base.rate_info)
    slot_info = tuple(replace(info, shadow=draw(st.sampled_from([False] * 6 + [True]))) for info in base.slot_info)
    quota_info = tuple(
        BucketInfo(draw(names), draw(limits), 0.0, draw(st.booleans()), draw(st.booleans()),
                   draw(st.sampled_from(["1d", "7d", "month"])))
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2])))
    )
    plan = AdmissionPlan(
        base.plan,
        rates=tuple(replace(bucket, counts_cost=info.counts_cost, shadow=info.shadow)
                    for bucket, info in zip(base.rates, rate_info)),
        rate_info=rate_info,
        slots=tuple(replace(bucket, shadow=info.shadow) for bucket, info in zip(base.slots, slot_info)),
        slot_info=slot_info, wait=0.0,
        quotas=tuple(
            QuotaBucket(f"q{i}", info.limit, info.period, info.counts_cost, info.shadow)  # type: ignore[arg-type]
            for i, info in enumerate(quota_info)
        ),
        quota_info=quota_info,
    )
    # counts near the limits, where a request's units and slots change the numbers
    result.rate_counts = [draw(st.integers(min_value=0, max_value=info.limit + 2)) for info in rate_info]
    if result.slot_counts:
        result.slot_counts = [draw(st.integers(min_value=0, max_value=info.limit + 2)) for info in slot_info]
    if quota_info:
        result.quota_counts = [draw(st.integers(min_value=0, max_value=10_050)) for _ in quota_info]
        result.quota_reset_ms = [draw(st.integers(min_value=0, max_value=31 * 86_400_000)) for _ in quota_info]
        result.now_ms = draw(st.integers(min_value=0, max_value=4_000_000_000_000))
        if not result.admitted and draw(st.booleans()):
            result.reason = "quota"
    charge = Charge(draw(st.sampled_from([0, 1, 2, 5, 25, 1000])), draw(st.sampled_from([1, 1, 2, 3, 64])))
    return plan, result, families, charge


@settings(max_examples=400)
@given(charged_cases())
def test_precomputed_headers_are_byte_identical_with_costs_quotas_and_shadows(
    case: tuple[AdmissionPlan, AdmitResult, frozenset[str], Charge],
) -> None:
    plan, result, families, charge = case
    policy = policy_header(plan)
    assert LimitHeaders(plan, families, policy)(result, charge) == limit_headers(plan, result, families, policy, charge)


def _as_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in headers}


CREDIT_PLAN = AdmissionPlan(
    "pro",
    rates=(RateBucket("r", 100, 60_000, counts_cost=True), RateBucket("t", 5, 60_000, shadow=True)),
    rate_info=(BucketInfo("credits", 100, 60.0, counts_cost=True), BucketInfo("tight", 5, 60.0, shadow=True)),
    slots=(SlotBucket("c", 4), SlotBucket("s", 1, shadow=True)),
    slot_info=(BucketInfo("browsers", 4, 0.0), BucketInfo("solo", 1, 0.0, shadow=True)),
    wait=0.0,
    quotas=(QuotaBucket("q", 1000, "1d"),),
    quota_info=(BucketInfo("daily", 1000, 0.0, True, period="1d"),),
)


def test_units_slots_and_quotas_in_the_headers_and_shadows_never() -> None:
    result = AdmitResult(True, None, 0, rate_counts=[40, 5], rate_reset_ms=[30_000, 1_000], slot_counts=[1, 1],
                         quota_counts=[990], quota_reset_ms=[3_600_000], now_ms=0.0)
    h = _as_dict(limit_headers(CREDIT_PLAN, result, FAMILIES, policy_header(CREDIT_PLAN), Charge(5, 2)))
    assert h["concurrency-limit"] == "4" and h["concurrency-remaining"] == "1"  # 1 held + this request's 2
    assert h["x-concurrent-current"] == "3"
    # the quota has the fewest left: 1000 - 990 - 5
    assert (h["x-ratelimit-limit"], h["x-ratelimit-remaining"], h["x-ratelimit-reset"]) == ("1000", "5", "3600")
    assert h["ratelimit-policy"] == (
        '"credits";q=100;w=60, "browsers";q=4;qu="concurrent-requests", "daily";q=1000;w=86400'
    )
    assert h["ratelimit"] == '"credits";r=55;t=30, "browsers";r=1, "daily";r=5;t=3600'
    assert "tight" not in h["ratelimit"] + h["ratelimit-policy"] and "solo" not in h["ratelimit"]


def test_a_quota_refusal_describes_the_quota() -> None:
    result = AdmitResult(False, "quota", 7_200_000, rate_counts=[0, 0], rate_reset_ms=[0, 0], slot_counts=[0, 0],
                         quota_counts=[998], quota_reset_ms=[7_200_000], now_ms=0.0)
    h = _as_dict(limit_headers(CREDIT_PLAN, result, FAMILIES, policy_header(CREDIT_PLAN), Charge(5)))
    assert h["x-ratelimit-limit"] == "1000" and h["x-ratelimit-remaining"] == "2"
    assert h["x-ratelimit-reset"] == "7200"
    assert '"daily";r=2;t=7200' in h["ratelimit"]
    assert refusal_message(CREDIT_PLAN, result, Charge(5)).startswith("This request needs 5 units; the daily quota")


def test_a_monthly_quota_announces_the_current_month() -> None:
    plan = replace(CREDIT_PLAN, quotas=(QuotaBucket("q", 9, "month"),),
                   quota_info=(BucketInfo("monthly", 9, 0.0, True, period="month"),))
    march = 1_740_787_200_000  # 2025-03-01T00:00Z
    assert quota_policy(plan, march - 1) == ['"monthly";q=9;w=2419200']  # February 2025: 28 days
    assert quota_policy(plan, march) == ['"monthly";q=9;w=2678400']  # March: 31
    assert period_seconds("7d", march) == 604_800 and period_seconds("1d", march) == 86_400
    result = AdmitResult(True, None, 0, [0, 0], [0, 0], [0, 0], quota_counts=[0], quota_reset_ms=[1], now_ms=5.0)
    h = _as_dict(limit_headers(plan, result, FAMILIES, policy_header(plan)))
    assert h["ratelimit-policy"].endswith(quota_policy(plan)[0])  # the wall clock's month, not now_ms's


def test_a_cost_refusal_says_when_the_request_can_never_fit() -> None:
    result = AdmitResult(False, "rate", 60_000, rate_counts=[0, 0], rate_reset_ms=[0, 0], slot_counts=[0, 0],
                         quota_counts=[0], quota_reset_ms=[1])
    assert "costs 500 units, more than the 100 units per 1m" in refusal_message(CREDIT_PLAN, result, Charge(500))
    h = _as_dict(limit_headers(CREDIT_PLAN, result, FAMILIES, policy_header(CREDIT_PLAN), Charge(500)))
    # 100 left, but fewer than the 500 asked: this limit refused, its reset is the Retry-After
    assert '"credits";r=100;t=60' in h["ratelimit"]
