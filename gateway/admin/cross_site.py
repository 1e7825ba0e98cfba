"""Which admin requests a web page may have sent behind the operator's back (CSRF): a pure
rule, no I/O.

The Host check (`gateway.admin.exposure`) stops DNS rebinding, but a page in the operator's
browser can still *send* a request to `http://127.0.0.1:9464` by its IP: a "simple" POST (a
`text/plain` body, no custom header) needs no CORS preflight, so on a port without
`admin_token` it would grant quota or end jobs, unread answers or not. Browsers say who sent
a request: `Origin` on every request but GET/HEAD, and `Sec-Fetch-Site`. So a request that
may change state is refused when either names a page other than the admin port itself, and
one with a body must be `application/json` (UTF-8), which a page can send only after a
preflight that the admin port never grants. curl, scripts and Prometheus send neither header.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from gateway.config.units import split_host

SAFE_METHODS = frozenset({"GET", "HEAD"})  # change nothing; a page cannot read their answers
_DEFAULT_PORTS = {"http": 80, "https": 443}
_OTHER_SITES = frozenset({b"cross-site", b"same-site"})  # same-site: another port of localhost

Refusal = Literal["cross_origin", "not_json"]


def same_origin(origin: str, host: str | None) -> bool:
    """Whether `Origin` names the page `Host` names: the same name and port (a missing port is
    the scheme's default). Another port of the same host is another origin (another web app)."""
    scheme, sep, authority = origin.strip().partition("://")
    default = _DEFAULT_PORTS.get(scheme.lower())
    if not sep or default is None or host is None or any(c in authority for c in "/?#@\\"):
        return False  # `null` (a sandboxed or file: page) is no origin of ours either
    ours, theirs = split_host(host), split_host(authority)
    if ours is None or theirs is None:
        return False
    return theirs[0] == ours[0] and (theirs[1] or default) == (ours[1] or default)


def is_json(content_type: bytes) -> bool:
    """`application/json`, with no charset but UTF-8 (the body is parsed as UTF-8 only)."""
    media, _, params = content_type.decode("latin-1").partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def refusal(method: str, headers: Sequence[tuple[bytes, bytes]]) -> Refusal | None:
    """Why a request to the admin port must be refused as cross-site, or None.

    `cross_origin`: a request that may change state, sent by another page (`Origin` other than
    the request's own `Host`, or `Sec-Fetch-Site` cross-site/same-site). `not_json`: it carries
    a body that is not `application/json`.
    """
    if method in SAFE_METHODS:
        return None
    host = None
    origins: list[str] = []
    content_types: list[bytes] = []
    has_body = other_site = False
    for name, value in headers:
        if name == b"host":
            host = value.decode("latin-1")
        elif name == b"origin":
            origins.append(value.decode("latin-1"))
        elif name == b"sec-fetch-site":
            other_site = other_site or value.strip().lower() in _OTHER_SITES
        elif name == b"content-type":
            content_types.append(value)
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            has_body = True
    if other_site or any(not same_origin(origin, host) for origin in origins):
        return "cross_origin"
    if has_body and (len(content_types) != 1 or not is_json(content_types[0])):
        return "not_json"
    return None
