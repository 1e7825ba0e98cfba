"""The validated configuration: frozen values built once by the loader, never mutated.

Durations are float seconds; sizes are bytes. Everything the hot path needs per request is
derived from these once (see `gateway.admission`), never re-parsed per request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Scope = Literal["key", "workspace"]
OnError = Literal["local", "allow", "deny"]
Counts = Literal["requests", "cost"]
Period = Literal["1d", "7d", "month"]
HEADER_FAMILIES = ("concurrency", "x-concurrent", "x-ratelimit", "ietf")
# The header names each family writes (lower case): the gateway's own on every answer it
# forwards, so an upstream's copies are dropped (gateway/proxy/headers.py, HeaderPolicy).
HEADER_FAMILY_NAMES: dict[str, tuple[str, ...]] = {
    "concurrency": ("concurrency-limit", "concurrency-remaining"),
    "x-concurrent": ("x-concurrent-limit", "x-concurrent-current", "x-concurrent-remaining"),
    "x-ratelimit": ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"),
    "ietf": ("ratelimit", "ratelimit-policy"),
}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `limit` admitted requests in any sliding `window` seconds."""

    name: str
    limit: int
    window: float
    scope: Scope = "key"
    exact: bool = True
    counts: Counts = "requests"  # "cost": the window holds units (each request's cost)
    shadow: bool = False  # counted as if enforced, never refuses (gateway_shadow_refusals_total)


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """At most `limit` slots held at one moment (a request or async job holds its cost rule's
    `slots`, default 1)."""

    name: str
    limit: int
    scope: Scope = "key"
    wait: float = 0.0  # seconds a request may wait for a free slot before its 429
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class QuotaLimit:
    """At most `limit` units (or requests) per fixed UTC period: `1d`, `7d` (ISO week) or
    `month` (calendar month). Spent: `status` (402) with `error: quota_exceeded`."""

    name: str
    limit: int
    period: Period
    scope: Scope = "key"
    counts: Counts = "cost"
    shadow: bool = False
    status: int = 402


Limit = RateLimit | ConcurrencyLimit | QuotaLimit


# Upper bounds of one request's charge: a cost rule's `cost` and `slots`, an upstream's declared cost.
MAX_COST = 1000
MAX_SLOTS = 64


@dataclass(frozen=True, slots=True)
class CostRule:
    """`routes[].cost[]`: the first rule whose every condition holds prices the request.
    Conditions are exact: a query parameter given more than once matches when any of its values
    does (pricing never goes down by repeating a parameter); header names are lower-case."""

    cost: int
    slots: int = 1
    method: str | None = None  # upper-case
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: Mapping[str, Limit]


@dataclass(frozen=True, slots=True)
class Key:
    id: str  # public id: logs, admin API, upstream header; never the secret
    sha256: str  # lowercase hex digest of the secret key
    plan: str
    workspace: str | None = None
    overrides: Mapping[str, int] = field(default_factory=dict)  # limit name -> number


@dataclass(frozen=True, slots=True)
class Job:
    limit: str  # the concurrency limit the job holds
    id_path: str  # dotted path to the job id in the upstream's 2xx JSON answer
    status_path: str  # e.g. /v1/crawl/{id}
    status_field: str
    done: tuple[str, ...]
    max_duration: float


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # exact, with {name} for one segment, or ending in /** for any suffix
    methods: frozenset[str] | None  # upper-case; None = any method
    limits: tuple[str, ...]
    per_route: frozenset[str] = frozenset()
    job: Job | None = None
    cost: tuple[CostRule, ...] = ()  # empty: every request costs 1 and holds 1 slot


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str  # scheme://host:port[/base-path], no trailing slash, no query
    client: Literal["aiohttp", "httpx"] = "aiohttp"
    connect_timeout: float = 5.0
    timeout: float = 300.0
    max_connections: int = 512
    # A pooled upstream connection idle this long is closed by the gateway: below the upstream's
    # own keep-alive timeout, so the gateway never reuses one the upstream is closing.
    keep_alive: float = 4.0
    set_headers: tuple[tuple[str, str], ...] = ()
    key_id_header: str = "X-Gateway-Key-Id"
    plan_header: str = "X-Gateway-Plan"
    # The upstream's response header declaring what a request really cost: the charge is
    # settled to it (never forwarded to the client as such). None: the cost rules' price stands.
    cost_header: str | None = None
    # "success_only": a non-2xx answer is refunded (settled to 0).
    charge: Literal["always", "success_only"] = "always"


@dataclass(frozen=True, slots=True)
class Store:
    url: str = "memory://"
    prefix: str = "gw"
    timeout: float = 0.1
    on_error: OnError = "local"
    lease: float = 30.0
    # `on_error: local` divides every limit by this while the store is down (1: each replica
    # enforces the full limit, so N replicas admit up to N x the limit; see docs/failure-modes.md).
    local_divisor: int = 1


@dataclass(frozen=True, slots=True)
class Identity:
    api_key_headers: tuple[str, ...] = ("X-API-Key", "Authorization")
    api_key_query: str | None = "apikey"
    trusted_proxies: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Bans:
    strikes: int = 20
    within: float = 60.0
    duration: float = 300.0
    factor: float = 2.0
    max_duration: float = 86400.0
    remember: float = 86400.0
    allow: tuple[Network, ...] = ()
    ipv6_prefix: int = 64
    # A 429 is a strike only when the client came back early (docs/behaviour.md): while this
    # many refused requests of one key and route from one IP are still waiting as told ...
    tolerance: int = 16
    # ... where a concurrency 429 (Retry-After: 1) tells at least this wait (exponential
    # backoff from 0.5 s honours it).
    concurrency_grace: float = 0.5


@dataclass(frozen=True, slots=True)
class Config:
    upstream: Upstream
    keys: tuple[Key, ...]
    plans: Mapping[str, Plan]
    routes: tuple[Route, ...]
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:9464"
    admin_token: str | None = None
    # The admin port may listen beyond loopback without admin_token only when this says a
    # firewall guards it (gateway.admin.exposure).
    admin_open: bool = False
    # Extra Host names (or name:port) the admin API answers, besides loopback, IP addresses and
    # admin_listen's host: DNS rebinding protection (gateway.admin.exposure).
    admin_hosts: tuple[str, ...] = ()
    shutdown_grace: float = 20.0
    store: Store = field(default_factory=Store)
    identity: Identity = field(default_factory=Identity)
    max_request_body: int = 10 * 1024 * 1024
    # Longest a client may take to send its request headers, and its longest silence while
    # sending the body (slowloris / slow body): past it, 408 and the connection is closed.
    client_timeout: float = 30.0
    # Request head limits, enforced while parsing (gateway/head_limits.py): 414 / 431.
    max_request_line: int = 16 * 1024
    max_request_headers: int = 64 * 1024
    max_request_header_count: int = 100
    # Idle keep-alive connections from clients are closed after this; above the Retry-After of
    # the short windows clients sleep through, so a client that sleeps it finds its connection.
    client_keep_alive: float = 75.0
    # Open client connections per worker (gateway/connection_limits.py): from one client address
    # (an IPv6 client by its bans.ipv6_prefix; None: 512, or twice the largest concurrency limit
    # a key can hold if more), and in all (None: what the open-file limit allows).
    max_connections_per_client: int | None = None
    max_client_connections: int | None = None
    bans: Bans | None = None
    headers: frozenset[str] = frozenset(HEADER_FAMILIES)
    # The response header telling the client what its request was charged (every proxied response).
    cost_response_header: str = "X-Request-Cost"
    # A GET path the gateway answers itself with the caller's plan, limits and usage (None: off).
    usage_path: str | None = None
    source: str = "<memory>"  # the file it was loaded from, for messages


def largest_concurrency(config: Config) -> tuple[int, str]:
    """The most slots one key can hold at once under any enforced concurrency limit (a key's
    override, or a workspace's whole budget), with where it is set; (0, "") when none."""
    largest, where = 0, ""
    for name, plan in config.plans.items():
        for limit in plan.limits.values():
            if isinstance(limit, ConcurrencyLimit) and not limit.shadow and limit.limit > largest:
                largest, where = limit.limit, f"plans.{name}.limits.{limit.name}"
    for key in config.keys:
        limits = config.plans[key.plan].limits if key.plan in config.plans else {}
        for name, number in key.overrides.items():
            limit = limits.get(name)
            if isinstance(limit, ConcurrencyLimit) and not limit.shadow and number > largest:
                largest, where = number, f"keys[{key.id}].limits.{name}"
    return largest, where


DEFAULT_PER_CLIENT = 512


def default_per_client(config: Config) -> int:
    """`max_connections_per_client` when unset (gateway/connection_limits.py): room for the
    largest concurrency limit twice over (the slots in flight, and as many kept-alive
    connections), 512 at least. A client using every slot its headers offer is never refused a
    connection."""
    return max(DEFAULT_PER_CLIENT, 2 * largest_concurrency(config)[0])
