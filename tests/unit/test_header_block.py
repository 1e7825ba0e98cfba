"""`EncodedLimitHeaders` (an admitted request's limit headers as one pre-encoded block) against
`LimitHeaders`: the same headers, the same bytes as `trusted_headers.encode` would give them,
for any plan shape, families and result; refusals and other shapes keep `LimitHeaders`' list."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import trusted_headers
from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.header_block import EncodedLimitHeaders, admitted_template
from gateway.admission.headers import LimitHeaders, policy_header
from gateway.proxy.settlement import CostPolicy
from gateway.store.base import AdmitResult, Charge, QuotaBucket, RateBucket, SlotBucket
from gateway.trusted_headers import EncodedHeaders
from tests.unit.test_limit_headers_fast_path import FAMILIES, cases, charged_cases


@given(cases())
def test_the_same_headers_as_limit_headers(case: tuple[AdmissionPlan, AdmitResult, frozenset[str]]) -> None:
    plan, result, families = case
    policy = policy_header(plan)
    expected = LimitHeaders(plan, families, policy)(result)
    headers = EncodedLimitHeaders(plan, families, policy)(result)
    assert list(headers) == expected
    assert len(headers) == len(expected)
    if isinstance(headers, EncodedHeaders):  # the block is what the check would have made of them
        assert result.admitted
        assert headers.block == trusted_headers.encode(expected)
    else:
        assert headers == expected


def _plan(rate_policy: str = "rpm", slot_policy: str = "requests") -> AdmissionPlan:
    return AdmissionPlan(
        "pro", rates=(RateBucket("r", 10, 60_000),), rate_info=(BucketInfo(rate_policy, 10, 60.0),),
        slots=(SlotBucket("c", 2),), slot_info=(BucketInfo(slot_policy, 2, 0.0),), wait=0.0,
    )


def test_an_admitted_request_gets_a_block_a_refused_one_a_list() -> None:
    plan = _plan()
    headers = EncodedLimitHeaders(plan, frozenset(FAMILIES), policy_header(plan))
    admitted = headers(AdmitResult(True, None, 0, rate_counts=[3], rate_reset_ms=[4_001], slot_counts=[0]))
    assert isinstance(admitted, EncodedHeaders)
    assert admitted.block == (
        b"concurrency-limit: 2\r\nconcurrency-remaining: 1\r\n"
        b"x-concurrent-limit: 2\r\nx-concurrent-current: 1\r\nx-concurrent-remaining: 1\r\n"
        b"x-ratelimit-limit: 10\r\nx-ratelimit-remaining: 6\r\nx-ratelimit-reset: 5\r\n"
        b'ratelimit-policy: "rpm";q=10;w=60, "requests";q=2;qu="concurrent-requests"\r\n'
        b'ratelimit: "rpm";r=6;t=5, "requests";r=1\r\n'
    )
    refused = headers(AdmitResult(False, "rate", 9_000, rate_counts=[10], rate_reset_ms=[9_000], slot_counts=[1]))
    assert type(refused) is list


def test_a_percent_sign_in_a_policy_name_is_text() -> None:
    plan = _plan(rate_policy="100%", slot_policy="a%db")
    policy = policy_header(plan)
    result = AdmitResult(True, None, 0, rate_counts=[0], rate_reset_ms=[1_000], slot_counts=[0])
    headers = EncodedLimitHeaders(plan, frozenset(FAMILIES), policy)(result)
    assert isinstance(headers, EncodedHeaders)
    assert b'"100%";r=9;t=1, "a%db";r=1' in headers.block
    assert list(headers) == LimitHeaders(plan, frozenset(FAMILIES), policy)(result)


def test_a_name_the_block_check_refuses_keeps_the_checked_path() -> None:
    plan = _plan(rate_policy="bad\nname")
    policy = policy_header(plan)
    assert admitted_template(plan, frozenset(FAMILIES), policy) is None
    result = AdmitResult(True, None, 0, rate_counts=[0], rate_reset_ms=[1_000], slot_counts=[0])
    headers = EncodedLimitHeaders(plan, frozenset(FAMILIES), policy)(result)
    assert type(headers) is list  # so trusted_headers.add checks it and uvicorn refuses it as before


def test_no_family_on_gives_no_headers() -> None:
    plan = _plan()
    result = AdmitResult(True, None, 0, rate_counts=[0], rate_reset_ms=[1_000], slot_counts=[0])
    assert EncodedLimitHeaders(plan, frozenset(), policy_header(plan))(result) == []


def test_add_hands_the_block_on_only_to_a_server_that_takes_it() -> None:
    block = EncodedHeaders(b"x-ratelimit-limit: 10\r\nratelimit: \"rpm\";r=6;t=5\r\n")
    with_block: dict[str, Any] = {"type": "http.response.start", "status": 200, "headers": []}
    trusted_headers.add(with_block, block, {"extensions": {trusted_headers.EXTENSION: {}}})
    assert with_block[trusted_headers.MESSAGE_KEY] == block.block and with_block["headers"] == []
    without: dict[str, Any] = {"type": "http.response.start", "status": 200, "headers": [(b"a", b"b")]}
    trusted_headers.add(without, block, {"extensions": {}})
    assert trusted_headers.MESSAGE_KEY not in without
    assert without["headers"] == [(b"a", b"b"), (b"x-ratelimit-limit", b"10"), (b"ratelimit", b'"rpm";r=6;t=5')]


@settings(max_examples=400)
@given(charged_cases())
def test_the_same_headers_with_costs_slots_quotas_and_shadows(
    case: tuple[AdmissionPlan, AdmitResult, frozenset[str], Charge],
) -> None:
    plan, result, families, charge = case
    policy = policy_header(plan)
    expected = LimitHeaders(plan, families, policy)(result, charge)
    headers = EncodedLimitHeaders(plan, families, policy)(result, charge)
    assert list(headers) == expected
    if isinstance(headers, EncodedHeaders):  # any shape, quotas and shadows too
        assert result.admitted
        assert headers.block == trusted_headers.encode(expected)
    else:
        assert headers == expected
        assert not result.admitted or not expected


def test_a_weighted_costly_request_gets_its_block_in_units_and_slots() -> None:
    plan = AdmissionPlan(
        "pro", rates=(RateBucket("r", 100, 60_000, counts_cost=True),),
        rate_info=(BucketInfo("credits", 100, 60.0, counts_cost=True),),
        slots=(SlotBucket("c", 4),), slot_info=(BucketInfo("browsers", 4, 0.0),), wait=0.0,
    )
    headers = EncodedLimitHeaders(plan, frozenset(FAMILIES), policy_header(plan))
    admitted = headers(AdmitResult(True, None, 0, rate_counts=[10], rate_reset_ms=[60_000], slot_counts=[1]),
                       Charge(25, 2))
    assert isinstance(admitted, EncodedHeaders)
    assert b"x-ratelimit-remaining: 65\r\n" in admitted.block and b"concurrency-remaining: 1\r\n" in admitted.block
    assert b'ratelimit: "credits";r=65;t=60, "browsers";r=1\r\n' in admitted.block


def test_a_shadow_limit_anywhere_keeps_the_template_a_quota_gets_the_joined_block() -> None:
    base = _plan()
    shadowed = replace(base, rates=(RateBucket("s", 5, 1_000, shadow=True), RateBucket("r", 10, 60_000)),
                       rate_info=(BucketInfo("shadow", 5, 1.0, shadow=True), BucketInfo("rpm", 10, 60.0)),
                       slots=(SlotBucket("cs", 1, shadow=True), SlotBucket("c", 2)),
                       slot_info=(BucketInfo("one", 1, 0.0, shadow=True), BucketInfo("requests", 2, 0.0)))
    quota = replace(base, quotas=(QuotaBucket("q", 5, "1d"),),
                    quota_info=(BucketInfo("daily", 5, 0.0, True, period="1d"),))
    assert admitted_template(shadowed, frozenset(FAMILIES), policy_header(shadowed)) is not None
    assert admitted_template(quota, frozenset(FAMILIES), policy_header(quota)) is None
    result = AdmitResult(True, None, 0, rate_counts=[4, 3], rate_reset_ms=[900, 4_001], slot_counts=[1, 0],
                         quota_counts=[1], quota_reset_ms=[5_000])
    for plan in (shadowed, quota):
        policy = policy_header(plan)
        plan_result = replace(result, rate_counts=result.rate_counts[-len(plan.rates):],
                              rate_reset_ms=result.rate_reset_ms[-len(plan.rates):],
                              slot_counts=result.slot_counts[-len(plan.slots):],
                              quota_counts=result.quota_counts[:len(plan.quotas)],
                              quota_reset_ms=result.quota_reset_ms[:len(plan.quotas)])
        headers = EncodedLimitHeaders(plan, frozenset(FAMILIES), policy)(plan_result)
        assert isinstance(headers, EncodedHeaders)
        assert headers.block == trusted_headers.encode(LimitHeaders(plan, frozenset(FAMILIES), policy)(plan_result))
    block = EncodedLimitHeaders(shadowed, frozenset(FAMILIES), policy_header(shadowed))(result)
    assert b"x-ratelimit-remaining: 6\r\n" in block.block and b"concurrency-remaining: 1\r\n" in block.block


def test_a_quota_name_the_block_check_refuses_keeps_the_checked_path() -> None:
    plan = replace(_plan(), quotas=(QuotaBucket("q", 5, "1d"),),
                   quota_info=(BucketInfo("bad\rname", 5, 0.0, True, period="1d"),))
    result = AdmitResult(True, None, 0, rate_counts=[0], rate_reset_ms=[1_000], slot_counts=[0],
                         quota_counts=[1], quota_reset_ms=[5_000])
    headers = EncodedLimitHeaders(plan, frozenset(FAMILIES), policy_header(plan))(result)
    assert type(headers) is list and headers  # so trusted_headers.add checks it and uvicorn refuses it as before


def _flat_policy(response: bytes = b"x-request-cost") -> CostPolicy:
    return CostPolicy(None, response, False, trusted_headers.encode([(response, b"0")]) is not None, flat=True)


@settings(max_examples=400)
@given(charged_cases(), st.sampled_from([b"x-request-cost", b"cost%d", b"bad cost"]))
def test_charged_is_the_limit_headers_then_the_charge_line(
    case: tuple[AdmissionPlan, AdmitResult, frozenset[str], Charge], response: bytes,
) -> None:
    """The flat-charge block (template with the charge line, or the joined list) is the bytes
    `CostPolicy.with_header` gives the general path's headers, for every plan shape."""
    plan, result, families, charge = case
    result.admitted, result.reason, result.from_cache = True, None, False
    if len(result.slot_counts) != len(plan.slot_info):
        result.slot_counts = [0] * len(plan.slot_info)
    policy = policy_header(plan)
    cost = _flat_policy(response)
    expected = list(cost.with_header(LimitHeaders(plan, families, policy)(result, charge), charge.cost))
    headers = EncodedLimitHeaders(plan, families, policy, cost).charged(result, charge)
    assert list(headers) == expected
    if isinstance(headers, EncodedHeaders):
        assert headers.block == trusted_headers.encode(expected)
    else:
        assert trusted_headers.encode(expected) is None or expected == [cost.header(charge.cost)]


def test_charged_without_a_result_is_the_charge_line_alone() -> None:
    plan = _plan()
    cost = _flat_policy()
    headers = EncodedLimitHeaders(plan, frozenset(FAMILIES), policy_header(plan), cost).charged(None, Charge(3, 1))
    assert list(headers) == [(b"x-request-cost", b"3")]
