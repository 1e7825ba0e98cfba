"""The `plans:` section: plan tiers and their named rate and concurrency limits.

A limit is `{rate: N/DURATION}` or `{concurrency: N}`, with `scope: key|workspace` (default key),
`exact` (rate only, default true) and `wait` (concurrency only, default 0). Routes and key
overrides refer to limits by name, so a name means the same kind of limit in every plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from gateway.config.model import ConcurrencyLimit, Limit, Plan, RateLimit, Scope
from gateway.config.nodes import ID, ID_RULE, Node, NodeReader, field, get
from gateway.config.units import parse_rate

SCOPES: tuple[Scope, ...] = ("key", "workspace")
LimitKind = type[RateLimit] | type[ConcurrencyLimit]

# Limit names become part of store key names.
LIMIT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LIMIT_NAME_RULE = "must be 1 to 64 letters, digits, '_' or '-'"


@dataclass(slots=True)
class PlanIndex:
    """What the rest of the config may refer to: plans, and limit names with their kind."""

    plans: dict[str, Plan] = dataclass_field(default_factory=dict)
    declared: dict[str, set[str]] = dataclass_field(default_factory=dict)  # plan -> limit names written
    kinds: dict[str, LimitKind] = dataclass_field(default_factory=dict)  # limit name -> kind (valid ones)
    readable: bool = True  # False when `plans` itself was unreadable: references are not checked
    limits_readable: bool = True  # False when some plan's limits were unreadable: same for limit names

    def defines_limit(self, name: str) -> bool:
        """True when some plan defines the name (or when nothing can be said)."""
        if not (self.readable and self.limits_readable):
            return True
        return any(name in names for names in self.declared.values())


def kind_name(kind: LimitKind) -> str:
    return "rate" if kind is RateLimit else "concurrency"


def read_plans(r: NodeReader, node: Node) -> PlanIndex:
    index = PlanIndex()
    entries = r.mapping(node, "plans")
    if entries is None:
        index.readable = False
        return index
    if not entries:
        r.problem(node, "plans", "must define at least one plan")
    first_seen: dict[str, str] = {}  # limit name -> plan path where its kind was first set
    for name, (key_node, value_node) in entries.items():
        path = f"plans.{name}"
        if not ID.fullmatch(name):
            r.problem(key_node, path, f"plan names {ID_RULE}")
        before = r.problem_count
        body = r.mapping(value_node, path, ("limits",))
        limits_node = get(body, "limits")
        limit_entries = r.mapping(limits_node, f"{path}.limits") if limits_node is not None else None
        if limit_entries is None and r.problem_count > before:
            index.limits_readable = False  # e.g. `limit:` misspelt: don't also report every use of its limits
        index.declared[name] = set(limit_entries or ())
        limits: dict[str, Limit] = {}
        for limit_name, (limit_key, limit_node) in (limit_entries or {}).items():
            limit_path = f"{path}.limits.{limit_name}"
            if not LIMIT_NAME.fullmatch(limit_name):
                r.problem(limit_key, limit_path, f"limit names {LIMIT_NAME_RULE}")
                continue
            limit = _limit(r, limit_node, limit_path, limit_name)
            if limit is None:
                continue
            kind = index.kinds.setdefault(limit_name, type(limit))
            first_seen.setdefault(limit_name, path)
            if kind is not type(limit):
                r.problem(
                    limit_node,
                    limit_path,
                    f"is a {kind_name(type(limit))} limit here but a {kind_name(kind)} limit in "
                    f"{first_seen[limit_name]}; a limit name means one kind in every plan",
                )
            limits[limit_name] = limit
        index.plans[name] = Plan(name=name, limits=limits)
    return index


def _limit(r: NodeReader, node: Node, path: str, name: str) -> Limit | None:
    m = r.mapping(node, path, ("rate", "concurrency", "scope", "exact", "wait"))
    if m is None:
        return None
    if "rate" in m and "concurrency" in m:
        r.problem(node, path, 'has both "rate" and "concurrency"; a limit is one or the other')
        return None
    if "rate" not in m and "concurrency" not in m:
        r.problem(node, path, 'needs "rate: N/DURATION" or "concurrency: N"')
        return None
    scope: Scope = field(m, "scope", lambda n: r.choice(n, f"{path}.scope", SCOPES), "key")
    if "rate" in m:
        if "wait" in m:
            r.problem(m["wait"][0], f"{path}.wait", '"wait" applies to concurrency limits only')
        rate = r.unit(m["rate"][1], f"{path}.rate", parse_rate)
        exact = field(m, "exact", lambda n: r.boolean(n, f"{path}.exact"), True)
        if rate is None:
            return None
        return RateLimit(name=name, limit=rate[0], window=rate[1], scope=scope, exact=exact)
    if "exact" in m:
        r.problem(m["exact"][0], f"{path}.exact", '"exact" applies to rate limits only')
    slots = r.integer(m["concurrency"][1], f"{path}.concurrency")
    wait = field(m, "wait", lambda n: r.duration(n, f"{path}.wait", allow_zero=True), 0.0)
    if slots is None:
        return None
    return ConcurrencyLimit(name=name, limit=slots, scope=scope, wait=wait)
