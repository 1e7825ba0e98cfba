"""The short human summary `gateway check-config` prints for a valid config.

It shows what an operator checks at a glance: where it listens, the upstream, the store (its
password redacted), each plan with its limits, each route with methods, limits and job, and how
many keys there are. Never a secret: keys are counted, not listed.
"""

from __future__ import annotations

from collections import Counter

from gateway.config.model import (
    DEFAULT_PER_CLIENT,
    HEADER_FAMILIES,
    ConcurrencyLimit,
    Config,
    CostRule,
    Limit,
    Plan,
    QuotaLimit,
    Route,
    default_per_client,
)
from gateway.config.store_url import redact
from gateway.config.units import format_duration, format_rate, format_size


def summarize(config: Config) -> str:
    lines = [
        f"{config.source}: OK",
        f"listen {config.listen}, admin {config.admin_listen}"
        f" (admin token {'set' if config.admin_token else 'not set'})",
        f"upstream {config.upstream.url} ({config.upstream.client},"
        f" timeout {format_duration(config.upstream.timeout)})",
        f"store {redact(config.store.url)} (prefix {config.store.prefix},"
        f" on_error {config.store.on_error}, timeout {format_duration(config.store.timeout)})",
        f"plans ({len(config.plans)}):",
        *(f"  {_plan(plan)}" for plan in config.plans.values()),
        f"routes ({len(config.routes)}), first match wins:",
        *(f"  {_route(route)}" for route in config.routes),
        _keys(config),
        f"max request body {format_size(config.max_request_body)}",
        _connections(config),
        _bans(config),
        "headers: " + (", ".join(f for f in HEADER_FAMILIES if f in config.headers) or "none"),
        _charging(config),
    ]
    return "\n".join(lines)


def _connections(config: Config) -> str:
    """The connection bounds per worker (gateway/connection_limits.py), defaults explained."""
    if config.max_connections_per_client is not None:
        per_client = str(config.max_connections_per_client)
    elif default_per_client(config) > DEFAULT_PER_CLIENT:
        per_client = f"{default_per_client(config)} (twice the largest concurrency limit)"
    else:
        per_client = str(DEFAULT_PER_CLIENT)
    total = (str(config.max_client_connections) if config.max_client_connections is not None
             else "what the open-file limit leaves (logged at start)")
    return f"client connections per worker: {per_client} per client address, {total} in all"


def _limit(limit: Limit) -> str:
    if isinstance(limit, ConcurrencyLimit):
        text = f"{limit.name} {limit.limit} concurrent"
        if limit.wait:
            text += f" (wait {format_duration(limit.wait)})"
    elif isinstance(limit, QuotaLimit):
        unit = "units" if limit.counts == "cost" else "requests"
        text = f"{limit.name} {limit.limit} {unit}/{limit.period} quota"
        if limit.status != 402:
            text += f" (refused with {limit.status})"
    else:
        text = f"{limit.name} {format_rate(limit.limit, limit.window)}"
        if limit.counts == "cost":
            text += " units"
        if not limit.exact:
            text += " (approximate: sliding-window counter)"
    if limit.scope == "workspace":
        text += " per workspace"
    if limit.shadow:
        text += " [shadow: never refuses]"
    return text


def _plan(plan: Plan) -> str:
    limits = ", ".join(_limit(limit) for limit in plan.limits.values())
    return f"{plan.name}: {limits or 'no limits'}"


def _route(route: Route) -> str:
    methods = ",".join(sorted(route.methods)) if route.methods is not None else "*"
    text = f"{methods} {route.path}: "
    if route.limits:
        text += ", ".join(f"{name} (per route)" if name in route.per_route else name for name in route.limits)
    else:
        text += "key only, no limits"
    if route.cost:
        text += "; cost " + ", ".join(_rule(rule) for rule in route.cost)
    if route.job is not None:
        job = route.job
        text += (
            f"; job holds {job.limit}{' (per route)' if job.limit in route.per_route else ''}"
            f" until {job.status_path} shows {job.status_field} in {'/'.join(job.done)}"
            f" (at most {format_duration(job.max_duration)})"
        )
    return text


def _rule(rule: CostRule) -> str:
    conditions = ([rule.method] if rule.method else []) + [f"?{n}={v}" for n, v in rule.query]
    conditions += [f"{n}: {v}" for n, v in rule.headers]
    text = f"{rule.cost}" + (f" x{rule.slots} slots" if rule.slots != 1 else "")
    return f"{text} if {' & '.join(conditions)}" if conditions else f"{text} otherwise"


def _charging(config: Config) -> str:
    text = f"charge told in {config.cost_response_header}"
    upstream = config.upstream
    if upstream.cost_header:
        text += f"; settled to the upstream's {upstream.cost_header}"
    if upstream.charge == "success_only":
        text += "; non-2xx answers refunded"
    if config.usage_path:
        text += f"; usage at GET {config.usage_path}"
    return text


def _keys(config: Config) -> str:
    per_plan = Counter(key.plan for key in config.keys)
    by_plan = ", ".join(f"{count} {plan}" for plan, count in per_plan.items())
    workspaces = {key.workspace for key in config.keys if key.workspace is not None}
    overridden = sum(1 for key in config.keys if key.overrides)
    text = f"keys: {len(config.keys)} ({by_plan})"
    if workspaces:
        text += f", {len(workspaces)} workspace{'s' if len(workspaces) != 1 else ''}"
    if overridden:
        text += f", {overridden} with overrides"
    return text


def _bans(config: Config) -> str:
    bans = config.bans
    if bans is None:
        return "bans: off"
    return (
        f"bans: {bans.strikes} strikes in {format_duration(bans.within)} → {format_duration(bans.duration)},"
        f" ×{bans.factor:g} each time, at most {format_duration(bans.max_duration)}"
        + (f", never for {', '.join(str(network) for network in bans.allow)}" if bans.allow else "")
    )
