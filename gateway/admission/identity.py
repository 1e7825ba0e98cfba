"""Who is calling: the API key from headers or query, and the client IP.

Pure functions over raw ASGI values. Keys are looked up by their SHA-256; a secret that
matched a key is then remembered in process memory (`KeyTable`), never logged or exposed.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes

from gateway.config.model import Identity, Key, Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def hash_key(secret: bytes | str) -> str:
    """The value of `keys[].sha256` for a secret key."""
    if isinstance(secret, str):
        secret = secret.encode()
    return hashlib.sha256(secret).hexdigest()


class KeyExtractor:
    """Finds the API key in a request, as configured in `identity`; built once per config."""

    def __init__(self, identity: Identity) -> None:
        self._headers = tuple(name.lower().encode("latin-1") for name in identity.api_key_headers)
        query = identity.api_key_query
        self._query_name = query.encode() if query else None

    def extract(self, headers: Sequence[tuple[bytes, bytes]], query_string: bytes) -> bytes | None:
        """The secret key bytes, or None when the request carries none."""
        for wanted in self._headers:
            for name, value in headers:
                if name == wanted:
                    secret = _bearer(value) if wanted == b"authorization" else value.strip()
                    if secret:
                        return secret
        if self._query_name is not None and query_string:
            return _query_value(query_string, self._query_name)
        return None


def _bearer(value: bytes) -> bytes | None:
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _query_value(query_string: bytes, name: bytes) -> bytes | None:
    for pair in query_string.split(b"&"):
        raw_name, sep, raw_value = pair.partition(b"=")
        if sep and unquote_to_bytes(raw_name.replace(b"+", b" ")) == name:
            value = unquote_to_bytes(raw_value.replace(b"+", b" "))
            if value:
                return value
    return None


class KeyTable:
    """Key records by the SHA-256 of their secret.

    A secret that matched once is remembered (in this process's memory only, never logged or
    exposed), so a known key is found by one dict lookup instead of a hash per request. Only
    matches are remembered: one secret per configured key at most, so the memo is bounded by
    the config, and a guessing client cannot grow it. The table is rebuilt with every config,
    so a removed key is forgotten with it.
    """

    def __init__(self, keys: Iterable[Key]) -> None:
        self._by_hash: Mapping[str, Key] = {key.sha256: key for key in keys}
        self._by_secret: dict[bytes, Key] = {}

    def lookup(self, secret: bytes) -> Key | None:
        key = self._by_secret.get(secret)
        if key is None:
            key = self._by_hash.get(hashlib.sha256(secret).hexdigest())
            if key is not None:
                self._by_secret[secret] = key
        return key


def parse_ip(text: str) -> IPAddress | None:
    """An IP from an X-Forwarded-For hop: tolerates `1.2.3.4:80`, `[::1]:443`, `[::1]`;
    IPv4-mapped IPv6 is unwrapped. Anything else (`unknown`, garbage) gives None."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port; bare IPv6 has several colons
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return unwrap(ip)


def unwrap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(ip: IPAddress, trusted: Sequence[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


# More trusted hops than any real chain of proxies has. Each hop costs an address parse, and a
# trusted peer's header can hold thousands of them (~20 ms at the head's 64 KiB bound, the
# event loop stalled meanwhile): past this many the chain is treated as garbage.
MAX_PROXY_HOPS = 20


def client_ip(
    peer: str | None,
    headers: Sequence[tuple[bytes, bytes]],
    trusted: Sequence[Network],
) -> IPAddress | None:
    """The socket peer; or, only when the peer is a trusted proxy, the rightmost untrusted
    valid IP of all X-Forwarded-For lines. A hop that is not an IP, or a chain of more than
    MAX_PROXY_HOPS trusted hops, ends the walk with the peer: garbage never becomes an identity
    an attacker could choose."""
    peer_ip = parse_ip(peer) if peer else None
    if peer_ip is None or not trusted or not is_trusted(peer_ip, trusted):
        return peer_ip
    lines = [value for name, value in headers if name == b"x-forwarded-for"]
    best = peer_ip
    walked = 0
    for line in reversed(lines):
        # Split off no more hops than are left to walk: the rest stays one unread string.
        for hop in reversed(line.decode("latin-1").rsplit(",", MAX_PROXY_HOPS - walked)):
            if walked == MAX_PROXY_HOPS:
                return peer_ip
            walked += 1
            ip = parse_ip(hop)
            if ip is None:
                return peer_ip
            if not is_trusted(ip, trusted):
                return ip
            best = ip
    return best
