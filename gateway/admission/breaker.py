"""A circuit breaker for store calls: after repeated failures, stop paying the timeout.

Closed: every call goes to the store. After `threshold` consecutive failures it opens for
`cooldown` seconds, during which callers skip the store (the `on_error` mode decides).
Then one probe call is let through (half-open): success closes it, failure reopens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(self, threshold: int = 3, cooldown: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._asked_at = 0.0  # the last call to `allow` or `failure` (a breaker not clean)
        # No failure since the last success: the hot path's one check (`allow` is True, and
        # `success` would change nothing).
        self.clean = True

    @property
    def is_open(self) -> bool:
        return self._failures >= self._threshold

    def sibling(self) -> CircuitBreaker:
        """A new, closed breaker with the same settings."""
        return CircuitBreaker(self._threshold, self._cooldown, self._clock)

    def allow(self) -> bool:
        """May this call go to the store?"""
        now = self._asked_at = self._clock()
        if self._failures < self._threshold:
            return True
        if self._probing or now < self._open_until:
            return False
        self._probing = True  # exactly one probe while half-open
        return True

    def seconds_until_probe(self) -> float:
        return max(0.0, self._open_until - self._clock())

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self.clean = True

    def abandon(self) -> None:
        """A call that never finished (its caller was cancelled): it proves nothing either
        way, but it must give back the probe it may have held, or the breaker would stay
        half-open with no probe allowed, for ever."""
        self._probing = False

    def idle_for(self) -> float:
        """Seconds since the breaker was last asked or told of a failure."""
        return self._clock() - self._asked_at

    def failure(self) -> None:
        self.clean = False
        self._failures += 1
        self._probing = False
        now = self._asked_at = self._clock()
        if self._failures >= self._threshold:
            self._open_until = now + self._cooldown


# Clean breakers (no failure since their last success) hold nothing worth keeping: past this
# many domains they are dropped, so addresses that come and go cannot grow the table.
MAX_DOMAINS = 64
# A failing domain's breaker nobody has asked for this long is dropped: its primary no longer
# owns any slot a request needs (failed over to its replica, removed). Kept, it would leave the
# store degraded for ever (readiness, and under `local` the outage would never end).
STALE_AFTER = 10.0


class DomainBreakers:
    """A breaker per failure domain, for a store with several independent servers (Cluster:
    one per primary). One failing primary opens only its own breaker: the keys of the others
    keep their store. `default` is the breaker of calls whose domain is not known (no
    topology yet) and of the store as a whole (a failed start)."""

    def __init__(self, domain_of: Callable[[str], object], default: CircuitBreaker) -> None:
        self._domain_of = domain_of
        self._by_domain: dict[object, CircuitBreaker] = {None: default}
        self._default = default

    def for_tag(self, tag: str) -> CircuitBreaker:
        """The breaker of the server that decides calls over `tag`'s keys now."""
        domain = self._domain_of(tag)
        breaker = self._by_domain.get(domain)
        if breaker is None:
            if len(self._by_domain) >= MAX_DOMAINS:
                self._by_domain = {d: b for d, b in self._by_domain.items() if not b.clean or d is None}
            breaker = self._by_domain[domain] = self._default.sibling()
        return breaker

    @property
    def is_open(self) -> bool:
        return any(breaker.is_open for breaker in self._live())

    @property
    def clean(self) -> bool:
        """No domain still asked for has failed since its last success."""
        return all(breaker.clean for breaker in self._live())

    def _live(self) -> list[CircuitBreaker]:
        stale = [domain for domain, breaker in self._by_domain.items()
                 if not breaker.clean and breaker.idle_for() > STALE_AFTER]
        for domain in stale:
            if domain is None:  # the store's own (a failed start): kept, closed
                self._default.success()
            else:
                del self._by_domain[domain]
        return list(self._by_domain.values())
