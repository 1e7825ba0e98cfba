"""Issue 18's config fields as the loader reads them: quotas, `counts`, `shadow`, cost rules,
the upstream's cost header, `usage_path`, and the credits example. Failures are data files
(tests/data/config/quota_*.yaml, cost_rule_*.yaml, usage_path_*.yaml ...)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.loader import ConfigError, load_config, load_config_text
from gateway.config.model import ConcurrencyLimit, CostRule, QuotaLimit, RateLimit
from gateway.config.summary import summarize
from tests.support.config_texts import minimal_config

ROOT = Path(__file__).resolve().parents[2]
CREDITS = ROOT / "config" / "credits.yaml"

BASE = minimal_config(
    "credits: {quota: 1000/month}",
    "daily: {quota: 50/1d, counts: requests, status: 429, scope: workspace, shadow: true}",
    "burn: {rate: 100/1m, counts: cost, shadow: true}",
    "rpm: {rate: 10/1m}",
    "slots: {concurrency: 4, shadow: false}",
    routes="  - path: /v1/**\n    limits: [credits, daily, burn, rpm, slots]\n",
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "t.yaml", env={})
    return caught.value.problems


def test_limit_fields_and_their_defaults() -> None:
    limits = load_config_text(BASE, "t.yaml", env={}).plans["free"].limits
    assert limits["credits"] == QuotaLimit("credits", 1000, "month")  # counts cost, 402, key scope
    assert limits["daily"] == QuotaLimit("daily", 50, "1d", "workspace", "requests", True, 429)
    assert limits["burn"] == RateLimit("burn", 100, 60.0, counts="cost", shadow=True)
    assert limits["rpm"] == RateLimit("rpm", 10, 60.0)  # counts requests
    assert limits["slots"] == ConcurrencyLimit("slots", 4)


def test_cost_rules_are_read_in_order_with_lower_case_header_names() -> None:
    text = BASE + """\
    cost:
      - {when: {query: {js_render: "true", page: 2}, headers: {X-Tier: " gold "}, method: get}, cost: 25, slots: 2}
      - {when: {query: {empty: ""}}, cost: 0}
      - {cost: 3}
"""
    route = load_config_text(text, "t.yaml", env={}).routes[0]
    assert route.cost == (
        CostRule(25, 2, "GET", (("js_render", "true"), ("page", "2")), (("x-tier", "gold"),)),
        CostRule(0, 1, None, (("empty", ""),)),
        CostRule(3),
    )


def test_upstream_cost_fields_usage_path_and_charge_header() -> None:
    text = BASE.replace(
        "  url: http://127.0.0.1:9000\n",
        "  url: http://127.0.0.1:9000\n  cost_header: X-Upstream-Cost\n  charge: success_only\n",
    ) + "usage_path: /v1/usage\ncost_response_header: X-Credits-Charged\n"
    config = load_config_text(text, "t.yaml", env={})
    assert (config.upstream.cost_header, config.upstream.charge) == ("X-Upstream-Cost", "success_only")
    assert (config.usage_path, config.cost_response_header) == ("/v1/usage", "X-Credits-Charged")
    plain = load_config_text(BASE, "t.yaml", env={})
    assert (plain.upstream.cost_header, plain.upstream.charge) == (None, "always")
    assert (plain.usage_path, plain.cost_response_header) == (None, "X-Request-Cost")


def test_a_quoted_or_interpolated_value_is_text_but_a_bare_boolean_is_refused() -> None:
    rule = '    cost: [{when: {query: {js: VALUE}}, cost: 5}]\n'
    ok = load_config_text(BASE + rule.replace("VALUE", "'yes'"), "t.yaml", env={})
    assert ok.routes[0].cost[0].query == (("js", "yes"),)
    via_env = load_config_text(BASE + rule.replace("VALUE", '"${JS:-true}"'), "t.yaml", env={})
    assert via_env.routes[0].cost[0].query == (("js", "true"),)
    assert problems_of(BASE + rule.replace("VALUE", "off")) == [
        "t.yaml:18: routes[0].cost[0].when.query.js: a bare off is YAML's boolean: write \"off\" in quotes"
        " (values are text, compared exactly)"
    ]


def test_every_limit_of_a_route_may_be_shadow() -> None:
    text = BASE.replace("shadow: false", "shadow: true")
    text = text.replace("rpm: {rate: 10/1m}", "rpm: {rate: 10/1m, shadow: true}")
    text = text.replace("credits: {quota: 1000/month}", "credits: {quota: 1000/month, shadow: true}")
    config = load_config_text(text, "t.yaml", env={})
    assert all(limit.shadow for limit in config.plans["free"].limits.values())


def test_a_rule_that_fits_exactly_is_accepted_and_one_unit_more_is_not() -> None:
    fits = BASE + "    cost: [{cost: 100, slots: 4}]\n"  # burn is 100 units, slots 4
    assert load_config_text(fits, "t.yaml", env={}).routes[0].cost == (CostRule(100, 4),)
    assert [p.split(": ", 2)[2].split(" is")[0] for p in problems_of(fits.replace("cost: 100", "cost: 101"))] == [
        "cost 101"
    ]
    assert len(problems_of(fits.replace("slots: 4", "slots: 5"))) == 1


def test_a_requests_counting_limit_takes_any_cost() -> None:
    text = BASE.replace("burn: {rate: 100/1m, counts: cost, shadow: true}", "burn: {rate: 100/1m}")
    text = text.replace("credits: {quota: 1000/month}", "credits: {quota: 1000/month, counts: requests}")
    config = load_config_text(text + "    cost: [{cost: 1000}]\n", "t.yaml", env={})
    assert config.routes[0].cost == (CostRule(1000),)


# -- the example ---------------------------------------------------------------------------------


def test_summary_shows_quotas_shadow_costs_and_charging() -> None:
    lines = summarize(load_config(CREDITS, env={})).splitlines()
    assert (
        "  developer: credits 250000 units/month quota, rpm 600/1m, slots 10 concurrent,"
        " credit_burn 2000/1m units [shadow: never refuses]"
    ) in lines
    assert (
        "  * /v1/**: credits, rpm, slots, credit_burn; cost 25 x2 slots if ?js_render=true & ?premium_proxy=true,"
        " 5 x2 slots if ?js_render=true, 10 if ?premium_proxy=true, 1 otherwise"
    ) in lines
    assert lines[-1] == (
        "charge told in X-Request-Cost; settled to the upstream's X-Upstream-Cost; non-2xx answers refunded;"
        " usage at GET /v1/usage"
    )


def test_every_new_field_is_documented() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for field in (
        "usage_path", "cost_response_header", "cost_header", "charge", "success_only", "quota", "counts",
        "shadow", "status", "slots", "when.query", "when.headers", "when.method", "credits.yaml",
    ):
        assert f"`{field}`" in docs or f"`{field}:" in docs, field


# -- hostile values in every new field: located problems, never a traceback ------------------------

FIELDS = """\
upstream:
  url: http://127.0.0.1:9000
  cost_header: {cost_header}
  charge: {charge}
keys:
  - id: alice
    key: alice-demo-key
    plan: free
    limits: {{credits: {override}}}
plans:
  free:
    limits:
      credits: {{quota: {quota}, counts: {counts}, status: {status}, shadow: {shadow}}}
      burn: {{rate: {rate}, counts: {counts}, shadow: {shadow}}}
      slots: {{concurrency: {concurrency}}}
routes:
  - path: /v1/**
    limits: [credits, burn, slots]
    cost:
      - when: {{query: {{{name}: {value}}}, headers: {{{header}: {value}}}, method: {method}}}
        cost: {cost}
        slots: {slots}
      - {{cost: {cost}}}
usage_path: {usage_path}
cost_response_header: {header}
"""
SANE_FIELDS = {
    "cost_header": "X-Upstream-Cost", "charge": "always", "override": "500", "quota": "1000/month", "counts": "cost",
    "status": "402", "shadow": "false", "rate": "100/1m", "concurrency": "4", "name": "js", "value": '"true"',
    "header": "X-Cost", "method": "GET", "cost": "5", "slots": "2", "usage_path": "/v1/usage",
}
HOSTILE = st.one_of(
    st.sampled_from([
        "9" * 5000, "-1", "0", "1e999", "nan", "~", "''", "[]", "{}", "true", "yes", "!!int 1", "${X:-9}",
        "1000/24h", "0/month", "9" * 30 + "/1d", "100/1x", "/v1/{x}", "/v1/**", "v1", "Content-Length", "a b",
        '"\\x00"', '"%zz"', "GTE", "1001", "65", "100001/1m",
    ]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r{}[],#:&*!|>'\"%@`"), max_size=12),
)


def test_the_sane_fields_template_loads() -> None:
    config = load_config_text(FIELDS.format(**SANE_FIELDS), "t.yaml", env={})
    assert config.routes[0].cost[0] == CostRule(5, 2, "GET", (("js", "true"),), (("x-cost", "true"),))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({name: st.one_of(st.just(value), HOSTILE) for name, value in SANE_FIELDS.items()}))
def test_hostile_values_give_only_located_problems(fields: dict[str, str]) -> None:
    try:
        load_config_text(FIELDS.format(**fields), "t.yaml", env={})
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert re.match(r"t\.yaml:\d+: \S", problem) and "\n" not in problem, problem
