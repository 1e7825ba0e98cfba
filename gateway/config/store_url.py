"""A store URL read the one way both the config loader and the store read it, and printed
with its secrets masked.

`parse_redis_url` is the only parser of a Redis URL: the loader calls it to refuse a bad
`store.url` at load (`FILE:LINE: store.url: ...`), and the store builds its client from what it
returns (gateway/store/redis_client.py, pipelined.py), so a URL `check-config` passes is one the
worker can open. It imports nothing of redis-py: loading a config stays cheap. `redact` masks
what a URL may carry that is secret (userinfo, secret-looking query values) wherever one is
printed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from urllib.parse import SplitResult, parse_qsl, unquote, unquote_plus, urlsplit

_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")

STANDALONE_SCHEMES = frozenset({"redis", "rediss", "unix"})
SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
REDIS_SCHEMES = STANDALONE_SCHEMES | SENTINEL_SCHEMES | CLUSTER_SCHEMES
MAX_DB = 2**31 - 1  # Redis's `databases` is an int


class StoreUrlError(ValueError):
    """A Redis store URL the store could not open; the message quotes no value or credential of it."""


@dataclass(frozen=True)
class ParsedMultiHost:
    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None = dataclass_field(repr=False)
    path: list[str]
    query: dict[str, str]


@dataclass(frozen=True)
class RedisTarget:
    """A Redis store URL taken apart: what the store's client is built from."""

    scheme: str
    nodes: tuple[tuple[str, int], ...]  # (host, port); empty for a Unix socket
    socket_path: str | None  # unix://
    db: int
    username: str | None
    password: str | None = dataclass_field(repr=False)  # (kept out of any log of the target)
    service_name: str | None = None  # Sentinel: the master's name
    sentinel_username: str | None = None
    sentinel_password: str | None = dataclass_field(default=None, repr=False)
    # Further client options from the query, typed (redis-py keyword arguments; ssl_password
    # among them).
    options: dict[str, str | bool] = dataclass_field(default_factory=dict, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")


def _true_or_false(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ValueError("not true or false")


def _cert_reqs(text: str) -> str:
    if text.lower() not in ("none", "optional", "required"):
        raise ValueError("not none, optional or required")
    return text.lower()


def _text(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text


# The query options each scheme takes (beyond db, password, username and the Sentinel ones,
# which are fields of RedisTarget), each with its parser. Anything else is refused: redis-py
# would pass an unknown name on to its connection class and fail when the worker opens the
# store, and the timeouts, retries and pool size are the gateway's own (store.timeout).
_CLIENT_NAME = {"client_name": _text}
_TLS_OPTIONS = {
    "ssl_cert_reqs": _cert_reqs,
    "ssl_check_hostname": _true_or_false,
    "ssl_ca_certs": _text,
    "ssl_ca_path": _text,
    "ssl_certfile": _text,
    "ssl_keyfile": _text,
    "ssl_password": _text,
}
_OPTIONS: dict[str, dict[str, Callable[[str], str | bool]]] = {
    "redis": _CLIENT_NAME,
    "unix": _CLIENT_NAME,
    "rediss": {**_CLIENT_NAME, **_TLS_OPTIONS},
}
_FIELDS = {
    "redis": ("db", "username", "password"),
    "rediss": ("db", "username", "password"),
    "unix": ("db", "username", "password"),
    "redis+sentinel": ("db", "service_name", "sentinel_username", "sentinel_password"),
    "rediss+sentinel": ("db", "service_name", "sentinel_username", "sentinel_password"),
}


def parse_redis_url(url: str) -> RedisTarget:
    """The Redis store URL taken apart, as the store opens it; StoreUrlError says what is wrong
    (without quoting the URL: the caller shows it, redacted). No I/O."""
    if _CONTROL.search(url):
        raise StoreUrlError("must not contain spaces or control characters")
    scheme = url.partition("://")[0].lower()
    if scheme not in REDIS_SCHEMES or "://" not in url:
        raise StoreUrlError(f"must start with one of: {', '.join(s + '://' for s in sorted(REDIS_SCHEMES))}")
    if scheme == "unix":
        return _unix_target(url)
    default_port = 26379 if scheme in SENTINEL_SCHEMES else 6379
    parsed = parse_multi_host(url, default_port)
    query = _query_fields(scheme, parsed.query)
    options = _query_options(scheme, parsed.query)
    username = query.get("username", parsed.username)
    password = query.get("password", parsed.password)
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_target(scheme, parsed, query, username, password)
    if scheme in CLUSTER_SCHEMES:
        if parsed.path not in ([], ["0"]):
            raise StoreUrlError("has a path, but Redis Cluster has only db 0 (give no path, or /0)")
        return RedisTarget(scheme, tuple(parsed.nodes), None, 0, username, password)
    if len(parsed.nodes) > 1:
        raise StoreUrlError(f"names several hosts: {scheme}:// takes one (several: redis+sentinel:// or redis+cluster://)")
    if len(parsed.path) > 1:
        raise StoreUrlError("has a path that is not /N (the db number)")
    db = _db(parsed.path[0] if parsed.path else None, query.get("db"))
    return RedisTarget(scheme, tuple(parsed.nodes), None, db, username, password, options=options)


def _unix_target(url: str) -> RedisTarget:
    """`unix://[user:password@]/absolute/path.sock[?db=N]`: no host, the path is the socket."""
    parts = _split(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    if host or not parts.path.startswith("/") or parts.fragment:
        raise StoreUrlError("must be unix:///absolute/path.sock, optionally ?db=N")
    user, _, secret = userinfo.partition(":")
    query = _query(parts.query)
    fields = _query_fields("unix", query)
    return RedisTarget("unix", (), unquote(parts.path), _db(None, fields.get("db")),
                       fields.get("username", unquote(user) or None), fields.get("password", unquote(secret) or None),
                       options=_query_options("unix", query))


def _sentinel_target(scheme: str, parsed: ParsedMultiHost, query: dict[str, str],
                     username: str | None, password: str | None) -> RedisTarget:
    """`redis+sentinel://...h:p[,h:p]/service_name[/db]` (or ?service_name=, ?db=)."""
    if len(parsed.path) > 2:
        raise StoreUrlError("has a path that is not /service_name[/db]")
    service = _one_of(parsed.path[0] if parsed.path else None, query.get("service_name"), "service name")
    if not service:
        raise StoreUrlError(f"needs a service name: {scheme}://host:port/service_name (or ?service_name=)")
    db = _db(parsed.path[1] if len(parsed.path) > 1 else None, query.get("db"))
    return RedisTarget(scheme, tuple(parsed.nodes), None, db, username, password, service,
                       query.get("sentinel_username"), query.get("sentinel_password"))


def _one_of(in_path: str | None, in_query: str | None, what: str) -> str | None:
    """A value the path or the query may give: both may, if they agree."""
    if in_path is not None and in_query is not None and in_path != in_query:
        raise StoreUrlError(f"gives two different {what}s, in the path and in the query")
    return in_query if in_query is not None else in_path


def _db(in_path: str | None, in_query: str | None) -> int:
    text = _one_of(in_path, in_query, "db")
    if text is None:
        return 0
    if not re.fullmatch(r"[0-9]{1,10}", text) or int(text) > MAX_DB:
        raise StoreUrlError(f"has a db that is not a number from 0 to {MAX_DB}")
    return int(text)


def _split(url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError:  # (its message may quote the netloc, password and all)
        raise StoreUrlError("is not a URL") from None


def _query(text: str) -> dict[str, str]:
    """The query's parameters, percent-decoded; a name given twice is refused (which one wins
    differs between clients)."""
    if any("=" not in piece for piece in text.split("&") if piece):
        # Not named: it may be the rest of a password holding a raw `&`.
        raise StoreUrlError("has a query part without '=' (write an '&' inside a value as %26)")
    query: dict[str, str] = {}
    for name, value in parse_qsl(text, keep_blank_values=True):
        if name in query:
            raise StoreUrlError(f"gives ?{name}= twice")
        query[name] = value
    return query


def _query_fields(scheme: str, query: dict[str, str]) -> dict[str, str]:
    """The query parameters that are fields of the target (db, credentials, Sentinel's); a
    name the form takes neither as a field nor as an option is refused."""
    fields = _FIELDS.get(scheme, ())
    accepted = set(fields) | set(_OPTIONS.get(scheme, {}))
    unknown = sorted(name for name in query if name not in accepted)
    if unknown:
        takes = ", ".join(sorted(accepted)) or "none"
        raise StoreUrlError(f"has an option {scheme}:// does not take: {', '.join(repr(n) for n in unknown)} "
                            f"(it takes: {takes})")
    return {name: value for name, value in query.items() if name in fields}


def _query_options(scheme: str, query: dict[str, str]) -> dict[str, str | bool]:
    """The client options in the query, typed; a value of the wrong type is refused."""
    parsers = _OPTIONS.get(scheme, {})
    options: dict[str, str | bool] = {}
    for name, value in query.items():
        if name in parsers:
            try:
                options[name] = parsers[name](value)
            except ValueError as exc:
                raise StoreUrlError(f"gives ?{name}= a value that is {exc}") from None
    return options


def parse_multi_host(url: str, default_port: int) -> ParsedMultiHost:
    """Split `scheme://[user:pass@]h1:p1,h2:p2/path?query` (urllib rejects the host list). Each
    port a number from 1 to 65535, each host present (an IPv6 address in brackets)."""
    parts = _split(url)
    if parts.fragment:
        raise StoreUrlError("must not have a #fragment")
    userinfo, at, netloc = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, _, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
    nodes = [_node(item.strip(), default_port) for item in netloc.split(",") if item.strip()]
    if not nodes:
        raise StoreUrlError("has no host")
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    return ParsedMultiHost(nodes, username, password, path, _query(parts.query))


def _node(item: str, default_port: int) -> tuple[str, int]:
    """One `host[:port]` of the host list (`[v6]:port` for an IPv6 address)."""
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise StoreUrlError("has a malformed [IPv6] host")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = item.partition(":")
        port_text = port_text if colon else None
        if ":" in (port_text or ""):
            raise StoreUrlError("has an IPv6 host without [brackets]")
    if not host:
        raise StoreUrlError("has a port without a host")
    if port_text is None or port_text == "":
        return unquote(host), default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise StoreUrlError("has a port that is not a number from 1 to 65535")
    return unquote(host), int(port_text)


# A query parameter being assigned: an `@` after one is in a parameter's value, not the userinfo's.
_ASSIGNMENT = re.compile(r"[?&][^?&=]*=")
# A query (or fragment) parameter; its value runs to the next parameter (a raw `&` or `#` in a
# password stays in it).
_PARAMETER = re.compile(r"([?&#])([^?&#=]*)=(.*?)(?=&[^&=]*=|\Z)", re.DOTALL)
# Parameter names that say their value is a secret (matched anywhere in the name, in any case:
# `sentinel_password`, `X-Amz-Signature`, `access_token`, `ssl_keyfile` too, which costs nothing).
_SECRET_NAME = re.compile(r"pass|pwd|token|key|secret|auth|sig", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with every credential replaced by `***` (for messages, logs and summaries):

    - the userinfo's password, after its first `:` and up to the last `@` before the query (a
      raw `@`, `/`, `?` or `#` in it included: a URL printed because it failed to parse must
      not leak it either); a userinfo without `:` (a token as the user name) is masked whole;
    - the value of every query parameter whose name, percent-decoded, looks secret
      (_SECRET_NAME: `?password=`, `?sentinel_password=`, `?api_key=`, `?token=`, `?sig=`...).
    """
    start = url.find("//")
    start = start + 2 if start >= 0 else 0
    head, rest = url[:start], url[start:]
    if not rest.startswith("/"):  # (unix:///path: no userinfo, the path may hold an `@`)
        rest = _mask_userinfo(rest)

    def masked(parameter: re.Match[str]) -> str:
        secret = _SECRET_NAME.search(unquote_plus(parameter[2])) is not None
        return f"{parameter[1]}{parameter[2]}=***" if secret else parameter[0]

    return head + _PARAMETER.sub(masked, rest)


def _mask_userinfo(rest: str) -> str:
    """`rest` (the URL after `//`) with its userinfo masked: `user:***@` or `***@`."""
    at = rest.rfind("@")
    while at > 0 and _ASSIGNMENT.search(rest, 0, at):
        at = rest.rfind("@", 0, at)
    if at <= 0:
        return rest
    user, colon, _ = rest[:at].partition(":")
    if colon:
        return f"{user}:***{rest[at:]}"
    if "/" in user:  # an `@` in the path of a URL without userinfo
        return rest
    return f"***{rest[at:]}"
