"""The operational sections: `upstream`, `store`, `identity`, `bans` and `headers`.

Each reader returns the model value, or None when the section is unusable (its problems are
recorded on the `NodeReader`); the caller then falls back to the model default.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import urlsplit

import yaml

from gateway.config.model import HEADER_FAMILIES, Bans, Identity, Network, OnError, Store, Upstream
from gateway.config.nodes import TOKEN, Node, NodeReader, did_you_mean, field, get
from gateway.config.store_url import StoreUrlError, parse_redis_url, redact
from gateway.config.units import quote

Client = Literal["aiohttp", "httpx"]
CLIENTS: tuple[Client, ...] = ("aiohttp", "httpx")
ON_ERROR: tuple[OnError, ...] = ("local", "allow", "deny")
Charging = Literal["always", "success_only"]
CHARGES: tuple[Charging, ...] = ("always", "success_only")
STORE_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
# TLS to Sentinel- or Cluster-managed Redis is not tested, so it is refused rather than half-working.
_UNTESTED_SCHEMES = ("rediss+sentinel", "rediss+cluster")
_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def read_upstream(r: NodeReader, node: Node) -> Upstream | None:
    allowed = (
        "url",
        "client",
        "connect_timeout",
        "timeout",
        "max_connections",
        "keep_alive",
        "set_headers",
        "key_id_header",
        "plan_header",
        "cost_header",
        "charge",
    )
    m = r.mapping(node, "upstream", allowed, required=("url",))
    if m is None:
        return None
    d = Upstream(url="")
    return Upstream(
        url=field(m, "url", lambda n: _upstream_url(r, n), ""),
        client=field(m, "client", lambda n: r.choice(n, "upstream.client", CLIENTS), d.client),
        connect_timeout=field(
            m, "connect_timeout", lambda n: r.duration(n, "upstream.connect_timeout"), d.connect_timeout
        ),
        timeout=field(m, "timeout", lambda n: r.duration(n, "upstream.timeout"), d.timeout),
        max_connections=field(
            m, "max_connections", lambda n: r.integer(n, "upstream.max_connections"), d.max_connections
        ),
        keep_alive=field(m, "keep_alive", lambda n: r.duration(n, "upstream.keep_alive"), d.keep_alive),
        set_headers=field(m, "set_headers", lambda n: _set_headers(r, n), d.set_headers),
        key_id_header=field(
            m, "key_id_header", lambda n: r.token(n, "upstream.key_id_header"), d.key_id_header
        ),
        plan_header=field(m, "plan_header", lambda n: r.token(n, "upstream.plan_header"), d.plan_header),
        cost_header=field(m, "cost_header", lambda n: _cost_header(r, n), d.cost_header),
        charge=field(m, "charge", lambda n: r.choice(n, "upstream.charge", CHARGES), d.charge),
    )


# Headers that frame or route a message, or that the gateway itself sets: the upstream's cost
# header is removed from answers, and the charge header is added to them, so neither may be one.
RESERVED_HEADERS = frozenset({
    "connection", "content-length", "content-type", "transfer-encoding", "keep-alive", "upgrade", "te",
    "trailer", "proxy-connection", "host", "date", "server", "set-cookie", "location", "retry-after",
    "ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
    "concurrency-limit", "concurrency-remaining", "x-concurrent-limit", "x-concurrent-current",
    "x-concurrent-remaining",
})  # fmt: skip
MAX_HEADER_NAME = 128


def header_name(r: NodeReader, node: Node, path: str) -> str | None:
    """A header name the gateway may add to or remove from answers (not a RESERVED_HEADERS one)."""
    name = r.token(node, path)
    if name is None:
        return None
    if len(name) > MAX_HEADER_NAME:
        r.problem(node, path, f"{quote(name)} is longer than {MAX_HEADER_NAME} characters")
        return None
    if name.lower() in RESERVED_HEADERS:
        r.problem(node, path, f"{quote(name)} frames the answer or is one the gateway sets; choose another name")
        return None
    return name


def _cost_header(r: NodeReader, node: Node) -> str | None:
    """`upstream.cost_header`: empty or null leaves it off."""
    if r.is_null(node, "upstream.cost_header"):
        return None
    return header_name(r, node, "upstream.cost_header")


def _upstream_url(r: NodeReader, node: Node) -> str | None:
    path = "upstream.url"
    text = r.string(node, path)
    if text is None:
        return None
    text = text.strip()
    problem = _upstream_url_problem(text)
    if problem is not None:
        r.problem(node, path, problem)
        return None
    scheme = urlsplit(text).scheme
    return scheme + text[len(scheme) :].rstrip("/")  # scheme lower-cased


def _upstream_url_problem(text: str) -> str | None:
    """What is wrong with `text` as upstream.url, the URL shown redacted (None: nothing)."""
    shown = quote(redact(text))
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # (its message may quote the netloc, credentials and all)
        return f"{shown} is not a URL (a malformed host or port)"
    if parts.scheme not in ("http", "https"):
        return f"{shown} must start with http:// or https://"
    if not parts.hostname:
        return f"{shown} has no host"
    if parts.username is not None or parts.password is not None:
        return f"{shown} must not carry credentials (use upstream.set_headers)"
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        # Shown without them: a query is where a careless URL carries its API key.
        return f"{quote(redact(_before_query(text)))} must not have a query or fragment (everything from '?' or '#')"
    if _CONTROL.search(text):
        return f"{shown} must not contain spaces or control characters"
    if port == 0:
        return f"{shown} has port 0"
    return None


def _before_query(url: str) -> str:
    return re.split(r"[?#]", url, maxsplit=1)[0]


def _set_headers(r: NodeReader, node: Node) -> tuple[tuple[str, str], ...] | None:
    entries = r.mapping(node, "upstream.set_headers")
    if entries is None:
        return None
    headers: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for name, (key_node, value_node) in entries.items():
        path = f"upstream.set_headers.{name}"
        if not TOKEN.fullmatch(name):
            r.problem(key_node, path, f"{quote(name)} is not a header name")
            continue
        if name.lower() in seen:
            r.problem(
                key_node,
                path,
                f"duplicate header (header names ignore case; first at line {seen[name.lower()]})",
            )
            continue
        seen[name.lower()] = r.line(key_node)
        if r.is_null(value_node, path):
            continue  # an empty value means "don't send it"
        value = r.scalar(value_node, path)
        if value is None:
            continue
        if not _HEADER_VALUE.fullmatch(value.text):
            r.problem(
                value_node, path, "must be printable ASCII (no CR, LF, NUL or other control characters)"
            )
        elif value.text.strip():
            headers.append((name, value.text.strip()))
    return tuple(headers)


def read_store(r: NodeReader, node: Node) -> Store | None:
    m = r.mapping(node, "store", ("url", "prefix", "timeout", "on_error", "lease", "local_divisor"))
    if m is None:
        return None
    d = Store()
    return Store(
        url=field(m, "url", lambda n: _store_url(r, n), d.url),
        prefix=field(m, "prefix", lambda n: _store_prefix(r, n), d.prefix),
        timeout=field(m, "timeout", lambda n: r.duration(n, "store.timeout"), d.timeout),
        on_error=field(m, "on_error", lambda n: r.choice(n, "store.on_error", ON_ERROR), d.on_error),
        lease=field(m, "lease", lambda n: r.duration(n, "store.lease"), d.lease),
        local_divisor=field(
            m, "local_divisor", lambda n: r.integer(n, "store.local_divisor"), d.local_divisor
        ),
    )


def _store_url(r: NodeReader, node: Node) -> str | None:
    text = r.string(node, "store.url")
    if text is None:
        return None
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in _UNTESTED_SCHEMES:
        r.problem(node, "store.url", f"{quote(redact(text))}: {scheme.lower()}:// (TLS to a Sentinel or Cluster) is "
                  "not supported; use redis+sentinel:// or redis+cluster:// on a private network, or rediss:// "
                  "to one server")
        return None
    if not sep or scheme.lower() not in STORE_SCHEMES:
        r.problem(
            node,
            "store.url",
            f"{quote(redact(text))} must start with one of: {', '.join(s + '://' for s in STORE_SCHEMES)}",
        )
        return None
    if scheme.lower() == "memory":
        if rest:
            r.problem(node, "store.url", f"{quote(redact(text))}: memory:// takes nothing after it")
            return None
        return "memory://"
    try:
        parse_redis_url(text)  # as the store will parse it when it opens (gateway/store/redis_client.py)
    except StoreUrlError as exc:
        r.problem(node, "store.url", f"{quote(redact(text))} {exc}")
        return None
    return text


# -- Redis store URLs ---------------------------------------------------------------------------
# Parsed here, not in gateway/store/, because the config loader must not import redis-py (a
# reload parses the file in a fresh process: tests/unit/test_config_import_cost.py). The store
# builds its client from this same `RedisTarget` (redis_client.connect), so a URL the loader
# accepts is one the store opens as the loader read it.

def _store_prefix(r: NodeReader, node: Node) -> str | None:
    text = r.string(node, "store.prefix")
    if text is not None and (re.search(r"[{}\s]", text) or not text.isprintable() or not text.isascii()):
        r.problem(node, "store.prefix", f"{quote(text)} must be printable ASCII without '{{', '}}' or spaces")
        return None
    return text


def read_identity(r: NodeReader, node: Node) -> Identity | None:
    m = r.mapping(node, "identity", ("api_key_headers", "api_key_query", "trusted_proxies"))
    if m is None:
        return None
    d = Identity()
    headers_node = get(m, "api_key_headers")
    headers = list(d.api_key_headers)
    if headers_node is not None:
        headers = r.list_of(headers_node, "identity.api_key_headers", r.token) or []
    query: str | None = d.api_key_query
    query_node = get(m, "api_key_query")
    if query_node is not None:
        query = None if r.is_null(query_node, "identity.api_key_query") else _query_name(r, query_node)
    headers_disabled = isinstance(headers_node, yaml.SequenceNode) and not headers_node.value
    query_disabled = query_node is not None and query is None and _query_disabled(r, query_node)
    if headers_disabled and query_disabled:
        r.problem(
            node, "identity", "no way left to present an API key: give api_key_headers or api_key_query"
        )
    proxies: list[Network] = field(
        m,
        "trusted_proxies",
        lambda n: r.list_of(n, "identity.trusted_proxies", lambda i, p: _network(r, i, p)),
        [],
    )
    return Identity(api_key_headers=tuple(headers), api_key_query=query, trusted_proxies=tuple(proxies))


def _query_disabled(r: NodeReader, node: Node) -> bool:
    value = r.scalar(node, "identity.api_key_query")
    return value is not None and (value.null or value.text == "")


def _query_name(r: NodeReader, node: Node) -> str | None:
    path = "identity.api_key_query"
    scalar = r.scalar(node, path)
    if scalar is None:
        return None
    if scalar.text == "":
        return None  # a quoted "" disables it too
    if not re.fullmatch(r"[A-Za-z0-9_.~-]+", scalar.text):
        r.problem(
            node,
            path,
            f"{quote(scalar.text)} is not a query parameter name (letters, digits, '_', '-', '.', '~')",
        )
        return None
    return scalar.text


def _network(r: NodeReader, node: Node, path: str) -> Network | None:
    text = r.string(node, path)
    if text is None:
        return None
    text = text.strip()
    if text in ("*", "0/0", "any", "all"):
        r.problem(
            node, path, f"{quote(text)} is not allowed: list CIDRs (0.0.0.0/0 and ::/0 cover every address)"
        )
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        r.problem(node, path, f"{quote(text)} is not an IP address or CIDR (e.g. 10.0.0.0/8)")
        return None


def read_bans(r: NodeReader, node: Node) -> Bans | None:
    allowed = ("strikes", "within", "duration", "factor", "max_duration", "remember", "allow", "ipv6_prefix",
               "tolerance", "concurrency_grace")
    m = r.mapping(node, "bans", allowed)
    if m is None:
        return None
    d = Bans()
    bans = Bans(
        strikes=field(m, "strikes", lambda n: r.integer(n, "bans.strikes"), d.strikes),
        within=field(m, "within", lambda n: r.duration(n, "bans.within"), d.within),
        duration=field(m, "duration", lambda n: r.duration(n, "bans.duration"), d.duration),
        factor=field(m, "factor", lambda n: r.number(n, "bans.factor", minimum=1.0), d.factor),
        max_duration=field(m, "max_duration", lambda n: r.duration(n, "bans.max_duration"), d.max_duration),
        remember=field(m, "remember", lambda n: r.duration(n, "bans.remember"), d.remember),
        allow=tuple(
            field(m, "allow", lambda n: r.list_of(n, "bans.allow", lambda i, p: _network(r, i, p)), [])
        ),
        ipv6_prefix=field(
            m, "ipv6_prefix", lambda n: r.integer(n, "bans.ipv6_prefix", 1, 128), d.ipv6_prefix
        ),
        tolerance=field(m, "tolerance", lambda n: r.integer(n, "bans.tolerance", 0, 1000), d.tolerance),
        concurrency_grace=field(
            m, "concurrency_grace", lambda n: r.duration(n, "bans.concurrency_grace", allow_zero=True),
            d.concurrency_grace,
        ),
    )
    if bans.max_duration < bans.duration:
        where = get(m, "max_duration") or get(m, "duration") or node
        r.problem(where, "bans.max_duration", "must be at least bans.duration")
    return bans


def read_headers(r: NodeReader, node: Node) -> frozenset[str] | None:
    def family(item: Node, path: str) -> str | None:
        text = r.string(item, path)
        if text is not None and text not in HEADER_FAMILIES:
            hint = did_you_mean(text, HEADER_FAMILIES)
            r.problem(
                item, path, f"unknown header family {quote(text)}{hint}; known: {', '.join(HEADER_FAMILIES)}"
            )
            return None
        return text

    families = r.list_of(node, "headers", family)
    return None if families is None else frozenset(families)
