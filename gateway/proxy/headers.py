"""Header and URL hygiene for the proxy: pure functions over raw ASGI header lists.

Request headers arrive from uvicorn with lower-case names. Everything that can be decided once
(which names to strip, which headers to add) lives in `HeaderPolicy`, built from the config; the
per-request functions only filter one list and append a few pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.config.model import Identity, Upstream
from gateway.proxy.target import path_problem

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still see.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"trailer",
    }
)

# Never taken from the client: the gateway sets or re-frames these itself.
# `expect` is hop-level too: uvicorn already answered any `100-continue` when the body was read.
# Every header some upstream reads as the client's address goes too (a client would choose its
# own identity there); the gateway's X-Forwarded-For / -Proto are the only ones sent. Any other
# `X-Forwarded-*` name is caught by its prefix (`_FORWARDED_PREFIX`).
_REQUEST_ONLY = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"x-original-forwarded-for",
    }
)
_FORWARDED_PREFIX = b"x-forwarded-"

# What uvicorn refuses to send (it raises after marking the response started), so an upstream
# header matching these must become a 502 instead. Names: RFC 9110 token characters only.
_BAD_NAME = re.compile(b"[^!#$%&'*+\\-.^_`|~0-9A-Za-z]")
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")

# aiohttp refuses a response header field over 16 KiB, h11 (httpx) a header block over 100 KiB:
# one limit for both clients, over the values the gateway would repeat.
MAX_RESPONSE_HEADER_BYTES = 64 * 1024

# A request target the gateway forwards: printable ASCII, no fragment.
_BAD_TARGET = re.compile(b"[^\x21-\x7e]|#")


class InvalidUpstreamHeaders(ValueError):
    """The upstream sent a header the gateway cannot repeat to its client."""


@dataclass(frozen=True, slots=True)
class HeaderPolicy:
    """Built once per config: what to strip from client requests and what to add."""

    strip: frozenset[bytes]
    key_id_header: bytes
    plan_header: bytes
    set_headers: tuple[tuple[bytes, bytes], ...]
    # What to strip from the upstream's answers: hop-by-hop, and the names the gateway writes
    # itself (its limit header families, its charge header), so a client never reads two
    # values under one name (`Concurrency-Limit: 25, 50`: the upstream's account and its own).
    response_strip: frozenset[bytes] = HOP_BY_HOP

    @classmethod
    def from_config(cls, upstream: Upstream, identity: Identity, owned_response: Iterable[str] = ()) -> HeaderPolicy:
        key_id = upstream.key_id_header.lower().encode("latin-1")
        plan = upstream.plan_header.lower().encode("latin-1")
        set_headers = tuple(
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in upstream.set_headers
        )
        strip = (
            HOP_BY_HOP
            | _REQUEST_ONLY
            | {name.lower().encode("latin-1") for name in identity.api_key_headers}
            | {key_id, plan}
            | {name for name, _ in set_headers}
        )
        owned = frozenset(name.lower().encode("latin-1") for name in owned_response)
        return cls(frozenset(strip), key_id, plan, set_headers, HOP_BY_HOP | owned)


def _connection_tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def upstream_request_headers(
    policy: HeaderPolicy,
    client_headers: Headers,
    *,
    key_id: str,
    plan: str,
    forwarded_for: str,
    forwarded_proto: str,
    reflected: bool = False,
) -> Headers:
    """The client's headers minus everything hop-level or gateway-owned, plus the gateway's own.

    Names listed in the client's `Connection` header are dropped too, computed from the client's
    headers before anything is added, so `Connection: X-Forwarded-For` can't remove the gateway's.
    Client-IP headers (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, `True-Client-IP`, ...) are
    dropped whoever sent them: the gateway's `forwarded_for` replaces them all.

    A name with `_` is dropped, as nginx does by default (`underscores_in_headers off`): CGI-style
    upstreams (WSGI, PHP) read `X_Gateway_Key_Id` as `X-Gateway-Key-Id` (both become
    `HTTP_X_GATEWAY_KEY_ID`), so it would pass every check made on the `-` spelling: another key's
    identity, a client IP, a header a cost rule prices (`X_Render` rendered at the price of none).

    `reflected`: the upstream answers with the request itself (TRACE, RFC 9110 §9.3.8, which
    forbids sending sensitive fields in one): `set_headers`, the operator's upstream credentials,
    are not added, or the client would read them in the answer.
    """
    strip = policy.strip
    kept: Headers = []
    named: set[bytes] | None = None
    for header in client_headers:
        name = header[0]
        if name in strip:
            if name == b"connection":
                named = (named or set()) | _connection_tokens(header[1])
            continue
        if name.startswith(_FORWARDED_PREFIX) or b"_" in name:
            continue
        kept.append(header)
    if named:
        kept = [header for header in kept if header[0] not in named]
    kept.append((b"x-forwarded-for", forwarded_for.encode("latin-1")))
    kept.append((b"x-forwarded-proto", forwarded_proto.encode("latin-1")))
    kept.append((policy.key_id_header, key_id.encode("latin-1")))
    kept.append((policy.plan_header, plan.encode("latin-1")))
    if not reflected:
        kept.extend(policy.set_headers)
    return kept


# Statuses whose responses never have content (RFC 9110 §6.4.1). A `Content-Length` on a 304
# is the length a 200 would have had (allowed), on a 204 an upstream's mistake; the server
# would wait for that many body bytes either way, and the body never comes.
NO_CONTENT = frozenset({204, 304})


def client_response_headers(status: int, upstream_headers: Headers, strip: frozenset[bytes] = HOP_BY_HOP) -> Headers:
    """The upstream's response headers minus hop-by-hop ones and the rest of `strip` (a
    `HeaderPolicy.response_strip`), everything else byte for byte.

    Raises `InvalidUpstreamHeaders` for a name or value the server would refuse to send, or for
    a status that is no final answer a client can be sent: a 1xx (the informational ones a
    client skips, 100 and 103, never get here; a 101 is a protocol switch the gateway never
    asks for) or 600 and up. A `Content-Length` next to a `Transfer-Encoding` is dropped too
    (RFC 9112 §6.3: the encoding wins, and the server re-frames the body), as is the framing
    of a response that has no content (204, 304).
    """
    if not 200 <= status <= 599:
        raise InvalidUpstreamHeaders(f"the upstream answered with status {status}")
    kept: Headers = []
    named: set[bytes] | None = None
    framed_by_encoding = False
    for header in upstream_headers:
        lower = header[0].lower()
        if lower in strip:
            if lower == b"connection":
                named = (named or set()) | _connection_tokens(header[1])
            elif lower == b"transfer-encoding":
                framed_by_encoding = True
            continue
        kept.append(header)
    drop_length = framed_by_encoding or status in NO_CONTENT
    if named or drop_length:
        kept = [
            header
            for header in kept
            if not (named and header[0].lower() in named)
            and not (drop_length and header[0].lower() == b"content-length")
        ]
    # One search per list instead of two per header: `-` is a valid name character and a tab a
    # valid value character, so the joins add nothing either pattern matches.
    values = b"\t".join(value for _, value in kept)
    if len(values) > MAX_RESPONSE_HEADER_BYTES:
        raise InvalidUpstreamHeaders("the upstream sent too many header bytes")
    if _BAD_NAME.search(b"-".join(name for name, _ in kept)) or _BAD_VALUE.search(values):
        raise InvalidUpstreamHeaders("the upstream sent an invalid header name or value")
    if any(not name for name, _ in kept):
        raise InvalidUpstreamHeaders("the upstream sent an empty header name")
    return kept


def strip_query_param(query_string: bytes, name: str) -> bytes:
    """Remove every `name=...` (or bare `name`) from a query string; the rest stays byte for byte.

    A parameter matches when its name, decoded the way `urllib.parse.parse_qsl` decodes it
    (`+` as space, then percent-decoding), equals `name` exactly, so `api%6Bey=` and `apikey=`
    are both removed for `apikey`.
    """
    if not query_string:
        return query_string
    target = name.encode()
    if target not in query_string and b"%" not in query_string and b"+" not in query_string:
        return query_string
    parts = query_string.split(b"&")
    kept = [part for part in parts if not _names(part, name, target)]
    return query_string if len(kept) == len(parts) else b"&".join(kept)


def _names(part: bytes, name: str, target: bytes) -> bool:
    raw = part.split(b"=", 1)[0]
    if raw == target:
        return True
    if b"%" not in raw and b"+" not in raw:
        return False
    return unquote(raw.replace(b"+", b" ").decode("latin-1"), encoding="utf-8", errors="replace") == name


def upstream_url(base_url: str, raw_path: bytes, query_string: bytes) -> str | None:
    """The upstream URL: the configured origin and base path, then the request's own path.

    Returns None for a target the gateway will not forward; the caller answers 400. Refused:
    anything not in origin-form (not starting with `/`, such as an absolute-form target that h11
    leaves in `raw_path`, or `*`); bytes outside printable ASCII or a `#`; and a path that an
    upstream could read as traversal or another path (gateway/proxy/target.py: dot segments,
    also encoded or with `;`, backslashes, control bytes, overlong UTF-8, double encoding),
    since the upstream or its client library would resolve it and escape the base path. Because the result is always
    `base_url + "/..."`, the authority ends where `base_url` ends: `//evil.com/x` or `/@evil.com`
    stay paths on the configured host.
    """
    if not raw_path.startswith(b"/") or _BAD_TARGET.search(raw_path) or _BAD_TARGET.search(query_string):
        return None
    if path_problem(raw_path) is not None:
        return None
    path = raw_path.decode("ascii")
    if query_string:
        return f"{base_url}{path}?{query_string.decode('ascii')}"
    return base_url + path

