"""The `plans:` section: plan tiers and their named rate, concurrency and quota limits.

A limit is `{rate: N/DURATION}`, `{concurrency: N}` or `{quota: N/PERIOD}` (PERIOD: 1d, 7d or
month), with `scope: key|workspace` (default key) and `shadow` (default false); `exact` (rate
only, default true), `wait` (concurrency only, default 0), `counts: requests|cost` (rate:
default requests; quota: default cost) and `status` (quota only, a 4xx, default 402). Routes and
key overrides refer to limits by name, so a name means the same kind of limit in every plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from gateway.config.model import ConcurrencyLimit, Counts, Limit, Plan, QuotaLimit, RateLimit, Scope
from gateway.config.nodes import ID, ID_RULE, Node, NodeReader, field, get
from gateway.config.units import MAX_COUNT, parse_quota, parse_rate

SCOPES: tuple[Scope, ...] = ("key", "workspace")
COUNTS: tuple[Counts, ...] = ("requests", "cost")
LimitKind = type[RateLimit] | type[ConcurrencyLimit] | type[QuotaLimit]
KINDS = ("rate", "concurrency", "quota")
# An exact (sliding-log) window that counts cost stores one member per unit: this many at most
# per bucket, so one key's log stays a few MB. Larger budgets use `exact: false` (one counter).
MAX_LOG_UNITS = 100_000

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
    return {RateLimit: "rate", ConcurrencyLimit: "concurrency", QuotaLimit: "quota"}[kind]


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
    allowed = (*KINDS, "scope", "exact", "wait", "counts", "shadow", "status")
    m = r.mapping(node, path, allowed)
    if m is None:
        return None
    kinds = [kind for kind in KINDS if kind in m]
    if len(kinds) > 1:
        both = " and ".join(f'"{kind}"' for kind in kinds)
        r.problem(node, path, f"has {both}; a limit is one of rate, concurrency or quota")
        return None
    if not kinds:
        r.problem(node, path, 'needs "rate: N/DURATION", "concurrency: N" or "quota: N/PERIOD"')
        return None
    kind = kinds[0]
    for option, applies in (("exact", "rate"), ("wait", "concurrency"), ("status", "quota")):
        if option in m and kind != applies:
            r.problem(m[option][0], f"{path}.{option}", f'"{option}" applies to {applies} limits only')
    if "counts" in m and kind == "concurrency":
        message = '"counts" applies to rate and quota limits (concurrency counts slots)'
        r.problem(m["counts"][0], f"{path}.counts", message)
    scope: Scope = field(m, "scope", lambda n: r.choice(n, f"{path}.scope", SCOPES), "key")
    shadow = field(m, "shadow", lambda n: r.boolean(n, f"{path}.shadow"), False)
    if kind == "rate":
        rate = r.unit(m["rate"][1], f"{path}.rate", parse_rate)
        exact = field(m, "exact", lambda n: r.boolean(n, f"{path}.exact"), True)
        counts: Counts = field(m, "counts", lambda n: r.choice(n, f"{path}.counts", COUNTS), "requests")
        if rate is None:
            return None
        if exact and counts == "cost" and rate[0] > MAX_LOG_UNITS:
            r.problem(
                m["rate"][1], f"{path}.rate",
                f"{rate[0]} units is more than an exact window counting cost holds ({MAX_LOG_UNITS}: one "
                "entry per unit); add `exact: false` (a sliding-window counter) for a budget this large",
            )  # fmt: skip
            return None
        return RateLimit(
            name=name, limit=rate[0], window=rate[1], scope=scope, exact=exact, counts=counts, shadow=shadow
        )
    if kind == "quota":
        quota = r.unit(m["quota"][1], f"{path}.quota", parse_quota)
        counts = field(m, "counts", lambda n: r.choice(n, f"{path}.counts", COUNTS), "cost")
        status = field(m, "status", lambda n: r.integer(n, f"{path}.status", 400, 499), 402)
        if quota is None:
            return None
        return QuotaLimit(
            name=name, limit=quota[0], period=quota[1], scope=scope, counts=counts, shadow=shadow, status=status
        )
    slots = r.integer(m["concurrency"][1], f"{path}.concurrency", 1, MAX_COUNT)
    wait = field(m, "wait", lambda n: r.duration(n, f"{path}.wait", allow_zero=True), 0.0)
    if slots is None:
        return None
    return ConcurrencyLimit(name=name, limit=slots, scope=scope, wait=wait, shadow=shadow)
