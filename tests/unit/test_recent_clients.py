from __future__ import annotations

import ipaddress

from gateway.recent_clients import RecentClients


def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def test_keeps_the_latest_ips_per_key_most_recent_first() -> None:
    recent = RecentClients(per_key=2, max_keys=2)
    recent.note("a", ip("1.1.1.1"))
    recent.note("a", ip("2.2.2.2"))
    recent.note("a", ip("1.1.1.1"))  # seen again: moves to the front
    recent.note("a", ip("3.3.3.3"))  # 2.2.2.2 was the oldest: dropped
    assert recent.of("a") == [ip("3.3.3.3"), ip("1.1.1.1")]
    assert recent.of("nobody") == []


def test_bounded_number_of_keys() -> None:
    recent = RecentClients(per_key=2, max_keys=2)
    recent.note("a", ip("1.1.1.1"))
    recent.note("b", ip("1.1.1.1"))
    recent.note("a", ip("1.1.1.2"))  # a is now the most recent key
    recent.note("c", ip("1.1.1.1"))  # b, the least recent, is forgotten
    assert recent.of("b") == [] and recent.of("a") and recent.of("c")
