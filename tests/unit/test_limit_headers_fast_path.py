"""`LimitHeaders` (the precomputed limit headers of one compiled plan) against `limit_headers`,
the straightforward reference: the same bytes for any plan shape, families and result."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.headers import LimitHeaders, limit_headers, policy_header
from gateway.store.base import AdmitResult, RateBucket, SlotBucket

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
