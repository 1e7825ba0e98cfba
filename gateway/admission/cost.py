"""What one request costs: a route's cost rules (`routes[].cost`), compiled once per route.

The first rule whose every condition holds prices the request (`Charge`: units and slots);
no rule matching, or no rules, is `cost: 1, slots: 1`. Pure: no I/O, nothing per request but
the matching itself.

Matching, on the raw request: the query string is decoded as
application/x-www-form-urlencoded (`+` is a space, `%XX` a byte, a malformed escape stays as
written) and compared as bytes with the rule's UTF-8 text, so bytes that are not UTF-8 never
match a rule and never raise; a parameter given more than once matches when any of its values
does. Header names are lower-case on both sides; values compare exactly after stripping
surrounding spaces and tabs, and a repeated header matches when any of its values does. The
method compares exactly (upper-case).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from urllib.parse import unquote_to_bytes

from gateway.config.model import CostRule
from gateway.store.base import ONE, Charge

# (method or None, ((name, value) query bytes...), ((name, value) header bytes...), charge)
_Compiled = tuple[str | None, tuple[tuple[bytes, bytes], ...], tuple[tuple[bytes, bytes], ...], Charge]
_NOTHING: dict[bytes, list[bytes]] = {}


class Pricing:
    """A route's cost rules, ready to match requests."""

    __slots__ = ("rules", "_compiled", "_query_names", "_header_names")

    def __init__(self, rules: Sequence[CostRule] = ()) -> None:
        self.rules = tuple(rules)
        self._compiled: tuple[_Compiled, ...] = tuple(
            (
                rule.method,
                tuple((name.encode(), value.encode()) for name, value in rule.query),
                tuple((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in rule.headers),
                Charge(rule.cost, rule.slots),
            )
            for rule in self.rules
        )
        # Only the parameters and headers some rule tests are collected from a request.
        self._query_names = frozenset(name for _, query, _, _ in self._compiled for name, _ in query)
        self._header_names = frozenset(name for _, _, headers, _ in self._compiled for name, _ in headers)

    def charge(self, method: str, query: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Charge:
        """The request's charge from its method (upper-case), raw query string and raw headers
        (names lower-case)."""
        if not self._compiled:
            return ONE
        params = _query_values(query, self._query_names) if self._query_names and query else _NOTHING
        fields = _header_values(headers, self._header_names) if self._header_names else _NOTHING
        # Plain loops: generator expressions would cost more than the matching itself.
        for want_method, want_query, want_headers, charge in self._compiled:
            if want_method is not None and want_method != method:
                continue
            for name, value in want_query:
                got = params.get(name)
                if got is None or value not in got:
                    break
            else:
                for name, value in want_headers:
                    got = fields.get(name)
                    if got is None or value not in got:
                        break
                else:
                    return charge
        return ONE


def _decode(raw: bytes) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" ")) if b"%" in raw or b"+" in raw else raw


def _query_values(query: bytes, names: frozenset[bytes]) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name not in names:
            if b"%" not in name and b"+" not in name:
                continue  # the common case: a plain name no rule tests
            name = _decode(name)
            if name not in names:
                continue
        value = _decode(value)
        got = found.get(name)
        if got is None:
            found[name] = [value]
        else:
            got.append(value)
    return found


def _header_values(headers: Sequence[tuple[bytes, bytes]], names: frozenset[bytes]) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in names:
            found.setdefault(name, []).append(value.strip(b" \t"))
    return found


@lru_cache(maxsize=4096)
def pricing_for(rules: tuple[CostRule, ...]) -> Pricing:
    """One Pricing per distinct rule list, shared by every plan and key of the routes using it."""
    return Pricing(rules) if rules else FLAT


FLAT = Pricing()
