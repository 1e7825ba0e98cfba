"""Everything derived from one config that requests read: built once, swapped whole on reload.

A request takes one reference to the current `Routing` at its start and uses it to the end,
so a reload never mixes two configs inside one request; except a request that waits for a slot,
which is decided, and goes on, under the config in force when it is (gateway/plan_in_force.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.admission.buckets import AdmissionPlan, build_plan
from gateway.admission.header_block import EncodedLimitHeaders
from gateway.admission.headers import policy_header
from gateway.admission.identity import KeyExtractor, KeyTable
from gateway.admission.routes import RouteTable
from gateway.config.model import HEADER_FAMILY_NAMES, Config, Key, Route
from gateway.jobs.table import JobTable
from gateway.proxy.headers import HeaderPolicy
from gateway.proxy.settlement import CostPolicy


@dataclass(frozen=True, slots=True)
class CompiledPlan:
    plan: AdmissionPlan
    route_label: str
    # this plan's limit headers (RateLimit-Policy fixed) from one admission result; an admitted
    # request's come pre-encoded (gateway/admission/header_block.py), with the charge line
    # under a flat cost policy (`limit_headers.charged`)
    limit_headers: EncodedLimitHeaders


@dataclass(slots=True)
class Routing:
    config: Config
    keys: KeyTable
    extractor: KeyExtractor
    routes: RouteTable
    header_policy: HeaderPolicy
    families: frozenset[str]
    missing_key_message: str
    jobs: JobTable  # which requests start or report async jobs
    cost_policy: CostPolicy  # how a request's charge is settled and told (gateway/proxy/settlement.py)
    # Some route has a job (`jobs` not empty): only then can an answer start or report one.
    has_jobs: bool = True
    _plans: dict[tuple[str, int], CompiledPlan] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config) -> Routing:
        jobs = JobTable(config.routes)
        return cls(
            config=config,
            keys=KeyTable(config.keys),
            extractor=KeyExtractor(config.identity),
            routes=RouteTable(config.routes),
            header_policy=HeaderPolicy.from_config(config.upstream, config.identity, _owned_response_headers(config)),
            families=config.headers,
            missing_key_message=_missing_key_message(config),
            jobs=jobs,
            cost_policy=CostPolicy.from_config(config),
            has_jobs=not jobs.empty,
        )

    def plan_for(self, key: Key, route_index: int, route: Route) -> CompiledPlan:
        """The compiled admission plan of (key, route), built on first use and kept."""
        cache_key = (key.id, route_index)
        compiled = self._plans.get(cache_key)
        if compiled is None:
            plan = build_plan(self.config, key, route)
            headers = EncodedLimitHeaders(plan, self.families, policy_header(plan), self.cost_policy)
            compiled = CompiledPlan(plan, route.path, headers)
            self._plans[cache_key] = compiled
        return compiled


def _owned_response_headers(config: Config) -> list[str]:
    """The header names the gateway writes on the answers it forwards: its limit families and
    its charge header. (When the upstream declares its cost under the charge header's own name,
    the settlement reads that copy and removes it itself.)"""
    names = [name for family in sorted(config.headers) for name in HEADER_FAMILY_NAMES[family]]
    charge = config.cost_response_header.lower()
    if charge != (config.upstream.cost_header or "").lower():
        names.append(charge)
    return names


def _missing_key_message(config: Config) -> str:
    ways = [f"the {name} header" for name in config.identity.api_key_headers]
    if config.identity.api_key_query:
        ways.append(f"the {config.identity.api_key_query} query parameter")
    return "No API key: send it in " + " or ".join(ways) + "."
