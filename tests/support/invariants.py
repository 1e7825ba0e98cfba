"""Checks of what must always hold, from what the upstream saw and what Redis holds."""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis


def max_in_window(arrivals: Sequence[float], window: float) -> int:
    """The largest number of arrivals inside any half-open interval of `window` seconds."""
    times = sorted(arrivals)
    best = 0
    start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def assert_no_leaks(client: redis.Redis, prefix: str) -> None:
    """Every slot set under `prefix` is empty and every key has a TTL."""
    for name in client.scan_iter(match=f"{prefix}:*", count=1000):
        text = name.decode()
        ttl = client.pttl(name)
        if ttl == -2:  # expired between the SCAN and now: gone, as it should go
            continue
        # -1 is "no TTL"; 0 is a key whose expiry falls in this very millisecond (Redis reports
        # the remaining time floored at 0 until the key is reaped): it has its TTL.
        assert ttl >= 0, f"{text} has no TTL ({ttl})"
        if ":c:" in text:
            assert client.zcard(name) == 0, f"slot set {text} still holds {client.zrange(name, 0, -1)}"


def assert_no_leaks_within(client: redis.Redis, prefix: str, within: float) -> None:
    """`assert_no_leaks` once it holds, or its failure after `within` seconds (releases are
    sent just after each answer, batched: the last ones land a moment later)."""
    deadline = time.monotonic() + within
    while True:
        try:
            assert_no_leaks(client, prefix)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def keys_per_primary(primaries: Sequence[redis.Redis], prefix: str) -> list[list[str]]:
    """The store keys under `prefix` that each primary of a cluster holds (SCAN on each node:
    a cluster node only ever lists the keys of its own slots)."""
    return [
        sorted(name.decode() for name in primary.scan_iter(match=f"{prefix}:*", count=1000))
        for primary in primaries
    ]


def assert_no_leaks_on_cluster(primaries: Sequence[redis.Redis], prefix: str) -> list[list[str]]:
    """`assert_no_leaks` on every primary of a cluster; returns the keys each one holds."""
    for primary in primaries:
        assert_no_leaks(primary, prefix)
    return keys_per_primary(primaries, prefix)
