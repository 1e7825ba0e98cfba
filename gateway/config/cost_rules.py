"""`routes[].cost`: a route's ordered cost rules, and the checks that each can be paid.

A rule is `{when: {query: {NAME: "VALUE"}, headers: {NAME: "VALUE"}, method: GET}, cost: N,
slots: K}`: `when` is optional (absent, the rule matches every request), `cost` is 0..MAX_COST
units, `slots` 1..MAX_SLOTS (default 1). The first rule whose every condition holds wins; no
rule matching costs 1 and holds 1 slot (gateway/admission/cost.py does the matching).

Values are text compared exactly. A value YAML reads as a boolean or null (`true`, `yes`, `~`)
is refused unless quoted ("true"): YAML tools rewrite such values (`yes` becomes `true`), so an
unquoted one would not reliably mean the text a client sends. Numbers are taken as written.

Checks, so that a request a rule prices can ever be admitted: its cost fits every cost-counting
rate and quota limit the route applies in every plan (and every key override of them), its
slots fit every concurrency limit the route applies; a rule an earlier one always wins over is
unreachable; the quotas a route enforces in one plan agree on their refusal `status`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from gateway.config.model import (
    MAX_COST,
    MAX_SLOTS,
    ConcurrencyLimit,
    CostRule,
    Key,
    Limit,
    Plan,
    QuotaLimit,
    RateLimit,
    Route,
)
from gateway.config.nodes import STD, TOKEN, Node, NodeReader, field, get
from gateway.config.units import quote

MAX_RULES = 64
MAX_CONDITIONS = 16  # query parameters and headers of one rule, together
MAX_TEXT = 256  # characters of a condition's name or value
_YAML_LOOKALIKES = (STD + "bool", STD + "null")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class RuleNodes:
    """A rule read, with the nodes later problems point at."""

    rule: CostRule
    position: int  # in the route's `cost` list
    node: Node
    cost_node: Node
    slots_node: Node


def read_cost_rules(
    r: NodeReader, node: Node, path: str, methods: frozenset[str] | None
) -> list[RuleNodes] | None:
    items = r.sequence(node, path)
    if items is None:
        return None
    if len(items) > MAX_RULES:
        r.problem(node, path, f"has {len(items)} rules; at most {MAX_RULES}")
        return None
    rules: list[RuleNodes] = []
    for position, item in enumerate(items):
        item_path = f"{path}[{position}]"
        read = _rule(r, item, item_path, position, methods)
        if read is None:
            continue
        earlier = next((e for e in rules if _wins_over(e.rule, read.rule)), None)
        if earlier is not None:
            r.problem(item, item_path, f"unreachable: {path}[{earlier.position}] matches every request it would")
        rules.append(read)
    return rules


def _rule(r: NodeReader, node: Node, path: str, position: int, methods: frozenset[str] | None) -> RuleNodes | None:
    m = r.mapping(node, path, ("when", "cost", "slots"), required=("cost",))
    if m is None:
        return None
    before = r.problem_count
    cost = field(m, "cost", lambda n: r.integer(n, f"{path}.cost", 0, MAX_COST), None)
    slots = field(m, "slots", lambda n: r.integer(n, f"{path}.slots", 1, MAX_SLOTS), 1)
    method, query, headers = None, (), ()
    when_node = get(m, "when")
    if when_node is not None:
        when = _when(r, when_node, f"{path}.when", methods)
        if when is not None:
            method, query, headers = when
    if cost is None or r.problem_count > before:
        return None
    rule = CostRule(cost=cost, slots=slots, method=method, query=query, headers=headers)
    return RuleNodes(rule, position, node, m["cost"][1], get(m, "slots") or m["cost"][1])


def _when(
    r: NodeReader, node: Node, path: str, methods: frozenset[str] | None
) -> tuple[str | None, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] | None:
    from gateway.config.routes import read_method  # routes imports this module

    m = r.mapping(node, path, ("query", "headers", "method"))
    if m is None:
        return None
    method = None
    method_node = get(m, "method")
    if method_node is not None:
        method = read_method(r, method_node, f"{path}.method")
        if method is not None and methods is not None and method not in methods:
            allowed = ", ".join(sorted(methods))
            r.problem(method_node, f"{path}.method", f"the route only takes {allowed}; this rule would never match")
    query = _conditions(r, get(m, "query"), f"{path}.query", header=False)
    headers = _conditions(r, get(m, "headers"), f"{path}.headers", header=True)
    if len(query) + len(headers) > MAX_CONDITIONS:
        r.problem(node, path, f"has {len(query) + len(headers)} conditions; at most {MAX_CONDITIONS}")
    return method, query, headers


def _conditions(r: NodeReader, node: Node | None, path: str, header: bool) -> tuple[tuple[str, str], ...]:
    if node is None:
        return ()
    entries = r.mapping(node, path)
    if entries is None:
        return ()
    found: dict[str, str] = {}
    for name, (key_node, value_node) in entries.items():
        item_path = f"{path}.{name}"
        if header:
            if not TOKEN.fullmatch(name) or len(name) > MAX_TEXT:
                r.problem(key_node, item_path, f"{quote(name)} is not a header name")
                continue
            name = name.lower()
            if name in found:
                r.problem(key_node, item_path, "duplicate header (header names ignore case)")
                continue
        elif name == "" or len(name) > MAX_TEXT:
            r.problem(key_node, item_path, f"a query parameter name is 1 to {MAX_TEXT} characters")
            continue
        value = _value(r, value_node, item_path, header)
        if value is not None:
            found[name] = value
    return tuple(found.items())


def _value(r: NodeReader, node: Node, path: str, header: bool) -> str | None:
    if isinstance(node, yaml.ScalarNode) and not node.style and node.tag in _YAML_LOOKALIKES:
        what = "boolean" if node.tag.endswith("bool") else "null"
        r.problem(node, path, f'a bare {node.value or "empty value"} is YAML\'s {what}: write "{node.value}" in quotes '
                  "(values are text, compared exactly)")  # fmt: skip
        return None
    scalar = r.scalar(node, path)
    if scalar is None:
        return None
    text = scalar.text
    if len(text) > MAX_TEXT:
        r.problem(node, path, f"{quote(text)} is longer than {MAX_TEXT} characters")
        return None
    if header:
        text = text.strip()  # compared with the request's value stripped the same way
        if not _HEADER_VALUE.fullmatch(text):
            r.problem(node, path, "a header value here is printable ASCII")
            return None
    return text


def _wins_over(earlier: CostRule, later: CostRule) -> bool:
    """True when every request `later` matches, `earlier` (first) matches too."""
    return (
        earlier.method in (None, later.method)
        and set(earlier.query) <= set(later.query)
        and set(earlier.headers) <= set(later.headers)
    )


# -- can each rule be paid ---------------------------------------------------------------------


def _counts_cost(limit: Limit) -> bool:
    return isinstance(limit, RateLimit | QuotaLimit) and limit.counts == "cost"


def lowest_overrides(keys: Sequence[Key]) -> dict[tuple[str, str], tuple[int, str]]:
    """(plan, limit name) -> (the lowest override any key of the plan sets, that key's id)."""
    lowest: dict[tuple[str, str], tuple[int, str]] = {}
    for key in keys:
        for name, number in key.overrides.items():
            seen = lowest.get((key.plan, name))
            if seen is None or number < seen[0]:
                lowest[(key.plan, name)] = (number, key.id)
    return lowest


def check_route_costs(
    r: NodeReader,
    route: Route,
    node: Node,
    path: str,
    rules: Sequence[RuleNodes],
    plans: Mapping[str, Plan],
    overrides: Mapping[tuple[str, str], tuple[int, str]],
) -> None:
    names = list(route.limits) + ([route.job.limit] if route.job is not None else [])
    for read in rules:
        reported: set[str] = set()  # one problem per rule and limit name, not one per plan
        for plan in plans.values():
            for name in names:
                limit = plan.limits.get(name)
                if limit is None or name in reported:
                    continue
                problem = _unpayable(read.rule, plan, limit, overrides.get((plan.name, name)))
                if problem is not None:
                    reported.add(name)
                    target = read.slots_node if isinstance(limit, ConcurrencyLimit) else read.cost_node
                    r.problem(target, f"{path}.cost[{read.position}]", problem)
    for plan in plans.values():
        quotas = [plan.limits[n] for n in names if isinstance(plan.limits.get(n), QuotaLimit)]
        statuses = {q.status for q in quotas if isinstance(q, QuotaLimit) and not q.shadow}
        if len(statuses) > 1:
            r.problem(
                node, path,
                f"plan {quote(plan.name)} enforces quotas with different statuses here "
                f"({', '.join(map(str, sorted(statuses)))}); a refusal must say one: give them one `status`",
            )  # fmt: skip


def _unpayable(rule: CostRule, plan: Plan, limit: Limit, override: tuple[int, str] | None) -> str | None:
    if isinstance(limit, ConcurrencyLimit):
        amount, what, unit = rule.slots, "slots", "slot" if limit.limit == 1 else "slots"
    elif _counts_cost(limit):
        amount, what, unit = rule.cost, "cost", "units"
    else:
        return None
    if amount > limit.limit:
        return (
            f"{what} {amount} is more than limit {quote(limit.name)} of plan {quote(plan.name)} allows "
            f"({limit.limit} {unit}): such a request could never be admitted"
        )
    if override is not None and amount > override[0]:
        return (
            f"{what} {amount} is more than key {quote(override[1])}'s override of limit {quote(limit.name)} "
            f"allows ({override[0]}): its requests priced so could never be admitted"
        )
    return None
