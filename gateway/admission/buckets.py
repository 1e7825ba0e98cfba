"""Which buckets one request must fit in, and what they are called in the store.

For a (key, route) pair this resolves the plan's limits named by the route (plus a job's
slot limit), applies the key's overrides and scopes, and names each bucket's store key.
The result is computed once per pair and cached by the caller: nothing here runs per request.

Store key names (RELIABILITY.md §3.3): every key of one admission shares one hash tag, the
workspace's when the key has one, else the key's own, so the single admission script runs
unchanged on Redis Cluster. Ids are hashed (a `{` in an id cannot move the slot, and names
stay short); names carry the limit name, never N or the window, so a reload that changes
numbers keeps the counters. A workspace bucket is therefore one budget for every plan of the
workspace: the loader refuses plans that define a workspace limit differently for keys of
one workspace (gateway/config/workspaces.py).

    {prefix}:{k:<h(key id)>}:r:<limit>                  key scope, key without workspace
    {prefix}:{w:<h(workspace)>}:k:<h(key id)>:r:<limit>  key scope, key in a workspace
    {prefix}:{w:<h(workspace)>}:w:r:<limit>             workspace scope
    ...:c:<limit> for concurrency slots, ...:q:<limit> for quotas (a workspace-scope quota is
    one balance for the workspace, a key's override its own cap inside it, as for rates);
    ...:p:<h(route)> appended for `per_route` buckets
    ...:a:<limit> instead of :r: for an `exact: false` rate limit (a counter, a Redis hash where
    the log is a sorted set: toggling `exact` in a reload names a new bucket, never WRONGTYPE)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.admission.cost import FLAT, Pricing, pricing_for
from gateway.config.model import Config, Key, Limit, QuotaLimit, RateLimit, Route
from gateway.store.base import QuotaBucket, RateBucket, SlotBucket
from gateway.store.names import short_hash as short_hash  # re-exported: bucket names use it


@dataclass(frozen=True, slots=True)
class BucketInfo:
    """What headers and messages say about one bucket."""

    policy: str  # the IETF policy item name
    limit: int
    window: float  # seconds; 0 for concurrency and quotas
    counts_cost: bool = False  # its numbers are units (cost), not requests
    shadow: bool = False  # never refuses, never in headers; would-be refusals are counted
    period: str = ""  # a quota's period ("1d", "7d", "month")
    name: str = ""  # the limit's name in the config (metrics label)


@dataclass(frozen=True, slots=True)
class AdmissionPlan:
    plan: str
    rates: tuple[RateBucket, ...]
    rate_info: tuple[BucketInfo, ...]
    slots: tuple[SlotBucket, ...]
    slot_info: tuple[BucketInfo, ...]
    wait: float  # longest `wait` among the slot limits (0: refuse at once)
    quotas: tuple[QuotaBucket, ...] = ()
    quota_info: tuple[BucketInfo, ...] = ()
    quota_status: int = 402  # the status of a quota refusal (the refusing quota's `status`)
    pricing: Pricing = FLAT  # the route's cost rules
    tag: str = ""  # the hash tag every bucket key shares (Cluster: it names the deciding primary)
    # Derived from the buckets once, here, rather than on every request (see __post_init__).
    empty: bool = field(init=False, repr=False, compare=False)  # no bucket at all: nothing to ask
    settles: bool = field(init=False, repr=False, compare=False)  # a settlement can re-price it

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty", not self.rates and not self.slots and not self.quotas)
        object.__setattr__(self, "settles", plan_settles(self.rates, self.quotas))


def plan_settles(rates: tuple[RateBucket, ...], quotas: tuple[QuotaBucket, ...]) -> bool:
    """Whether a settlement can ever re-price an admission of these buckets: only buckets that
    count cost are re-priced (gateway/admission/controller.py `settlement_of`)."""
    return any(rate.counts_cost for rate in rates) or any(quota.counts_cost for quota in quotas)


def hash_tag(prefix: str, key: Key) -> str:
    tag = f"w:{short_hash(key.workspace)}" if key.workspace else f"k:{short_hash(key.id)}"
    return f"{prefix}:{{{tag}}}"


def route_suffix(route: Route) -> str:
    methods = ",".join(sorted(route.methods)) if route.methods else "*"
    return f":p:{short_hash(methods + ' ' + route.path)}"


def route_limit_names(route: Route) -> tuple[str, ...]:
    names = list(route.limits)
    if route.job is not None and route.job.limit not in names:
        names.append(route.job.limit)
    return tuple(names)


def build_plan(config: Config, key: Key, route: Route) -> AdmissionPlan:
    plan = config.plans[key.plan]
    tag = hash_tag(config.store.prefix, key)
    own = f"{tag}:k:{short_hash(key.id)}" if key.workspace else tag
    rates: list[RateBucket] = []
    rate_info: list[BucketInfo] = []
    slots: list[SlotBucket] = []
    slot_info: list[BucketInfo] = []
    quotas: list[QuotaBucket] = []
    quota_info: list[BucketInfo] = []
    statuses: list[int] = []  # of the enforced quotas (check-config makes a route's agree)
    wait = 0.0

    for name in route_limit_names(route):
        limit: Limit | None = plan.limits.get(name)
        if limit is None:
            continue  # names a plan does not define are skipped for that plan (SPEC §3)
        suffix = route_suffix(route) if name in route.per_route else ""
        kind = _kind_letter(limit)
        override = key.overrides.get(name)
        # (store key, number, policy name) for each bucket this limit puts the request in
        targets: list[tuple[str, int, str]] = []
        if limit.scope == "workspace" and key.workspace:
            targets.append((f"{tag}:w:{kind}:{name}{suffix}", limit.limit, name))
            if override is not None:  # the key's own cap inside the shared budget
                targets.append((f"{own}:{kind}:{name}{suffix}", override, f"{name}.key"))
        else:
            targets.append((f"{own}:{kind}:{name}{suffix}", override or limit.limit, name))

        for store_key, number, policy in targets:
            if isinstance(limit, RateLimit):
                cost = limit.counts == "cost"
                window_ms = round(limit.window * 1000)
                rates.append(RateBucket(store_key, number, window_ms, limit.exact, cost, limit.shadow))
                rate_info.append(BucketInfo(policy, number, limit.window, cost, limit.shadow, name=name))
            elif isinstance(limit, QuotaLimit):
                cost = limit.counts == "cost"
                quotas.append(QuotaBucket(store_key, number, limit.period, cost, limit.shadow))
                quota_info.append(BucketInfo(policy, number, 0.0, cost, limit.shadow, limit.period, name))
                if not limit.shadow:
                    statuses.append(limit.status)
            else:
                slots.append(SlotBucket(store_key, number, limit.shadow))
                slot_info.append(BucketInfo(policy, number, 0.0, shadow=limit.shadow, name=name))
                if not limit.shadow:  # a shadow limit never makes a request wait
                    wait = max(wait, limit.wait)

    return AdmissionPlan(
        plan.name, tuple(rates), tuple(rate_info), tuple(slots), tuple(slot_info), wait,
        quotas=tuple(quotas), quota_info=tuple(quota_info), quota_status=statuses[0] if statuses else 402,
        pricing=pricing_for(route.cost) if route.cost else FLAT, tag=tag,
    )


def _kind_letter(limit: Limit) -> str:
    if isinstance(limit, RateLimit):
        return "r" if limit.exact else "a"
    return "q" if isinstance(limit, QuotaLimit) else "c"
