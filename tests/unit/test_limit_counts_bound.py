"""Every count a limit may have fits the integer of a structured header field (RFC 8941
§3.3.1: at most 15 digits), so `RateLimit-Policy` and `RateLimit` stay parseable at the bound.
Found by a client library: a rate of 10^15 passed the loader and gave `q=1000000000000000`,
which `http_sfv` refuses (the whole header with it)."""

from __future__ import annotations

import re

import pytest

from gateway.admission.buckets import build_plan
from gateway.admission.headers import policy_header, quota_policy
from gateway.config.loader import ConfigError, load_config_text

# RFC 8941 §3.3.1: an Integer is at most 15 decimal digits.
MAX_COUNT = 999_999_999_999_999
SF_INTEGER = re.compile(rb"=(-?\d+)")


def config_text(rate: int, slots: int, quota: int, override: int) -> str:
    return f"""
upstream: {{url: "http://127.0.0.1:9"}}
keys:
  - {{id: k, key: limits-bound-key-1, plan: big, limits: {{rpm: {override}}}}}
plans:
  big:
    limits:
      rpm: {{rate: {rate}/1m}}
      slots: {{concurrency: {slots}}}
      credits: {{quota: {quota}/month}}
routes:
  - {{path: /v1/**, limits: [rpm, slots, credits]}}
"""


def test_at_the_bound_every_policy_integer_is_a_structured_field_integer() -> None:
    config = load_config_text(config_text(MAX_COUNT, MAX_COUNT, MAX_COUNT, MAX_COUNT), "t.yaml")
    plan = build_plan(config, config.keys[0], config.routes[0])
    policy = policy_header(plan) + b", " + ", ".join(quota_policy(plan)).encode()
    numbers = SF_INTEGER.findall(policy)
    assert numbers and max(len(number) for number in numbers) == 15, policy


@pytest.mark.parametrize("field", ["rate", "slots", "quota", "override"])
def test_one_past_the_bound_is_a_located_problem(field: str) -> None:
    counts = dict.fromkeys(("rate", "slots", "quota", "override"), 10)
    counts[field] = MAX_COUNT + 1
    with pytest.raises(ConfigError) as caught:
        load_config_text(config_text(**counts), "t.yaml")
    [problem] = caught.value.problems
    assert problem.startswith("t.yaml:") and "999999999999999" in problem, problem
