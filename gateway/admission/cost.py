"""What one request costs: a route's cost rules (`routes[].cost`), compiled once per route.

The first rule whose every condition holds prices the request (`Charge`: units and slots);
no rule matching, or no rules, is `cost: 1, slots: 1`. Pure: no I/O, nothing per request but
the matching itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config.model import CostRule
from gateway.store.base import ONE, Charge


class Pricing:
    """A route's cost rules, ready to match requests."""

    __slots__ = ("rules",)

    def __init__(self, rules: Sequence[CostRule] = ()) -> None:
        self.rules = tuple(rules)

    def charge(self, method: str, query: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Charge:
        """The request's charge from its method (upper-case), raw query string and raw headers."""
        if not self.rules:
            return ONE
        raise NotImplementedError("cost rules: issue 18")


FLAT = Pricing()
