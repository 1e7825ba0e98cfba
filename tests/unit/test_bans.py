"""The pure part of IP bans: grouping (IPv6 prefixes, IPv4-mapped unwrapping), the allowlist,
escalation arithmetic, Retry-After, the local ban cache, and the early-return rule."""

from __future__ import annotations

import ipaddress
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.admission.bans import (
    BanCache,
    KnownBan,
    FIRST_BURST,
    ReturnLedger,
    ban_ms,
    group_of,
    is_exempt,
    parse_group,
    retry_after,
)
from gateway.config.model import Bans

ip = ipaddress.ip_address
net = ipaddress.ip_network


@pytest.mark.parametrize(
    ("address", "prefix", "group"),
    [
        ("203.0.113.7", 64, "203.0.113.7"),
        ("2001:db8:a::1", 64, "2001:db8:a::/64"),
        ("2001:db8:a:0:ffff:ffff:ffff:ffff", 64, "2001:db8:a::/64"),
        ("2001:db8:a:1::1", 64, "2001:db8:a:1::/64"),
        ("2001:db8:a:1::1", 48, "2001:db8:a::/48"),
        ("2001:db8::7", 128, "2001:db8::7"),
        ("::ffff:198.51.100.9", 64, "198.51.100.9"),  # dual-stack socket: still one IPv4 client
    ],
)
def test_group_of(address: str, prefix: int, group: str) -> None:
    assert group_of(ip(address), prefix) == group


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_one_ipv6_64_is_one_group_and_its_neighbours_are_not(network: int, host_a: int, host_b: int) -> None:
    a = ipaddress.IPv6Address((network << 64) | host_a)
    b = ipaddress.IPv6Address((network << 64) | host_b)
    if a.ipv4_mapped or b.ipv4_mapped:
        return  # ::ffff:0:0/96 is IPv4 space, grouped per address
    assert group_of(a, 64) == group_of(b, 64)
    neighbour = ipaddress.IPv6Address((((network + 1) % 2**64) << 64) | host_a)
    if not neighbour.ipv4_mapped:
        assert group_of(neighbour, 64) != group_of(a, 64)
    assert ip(group_of(a, 64).split("/")[0]) in net(f"{a}/64", strict=False)


@given(st.integers(0, 2**32 - 1), st.integers(1, 128))
def test_ipv4_mapped_is_grouped_like_the_ipv4_address(value: int, prefix: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    assert group_of(mapped, prefix) == group_of(v4, prefix) == str(v4)


@pytest.mark.parametrize(
    ("text", "group"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:a::99", "2001:db8:a::/64"),  # any address inside a banned prefix
        ("2001:db8:a::/64", "2001:db8:a::/64"),
        ("2001:db8:a::5/64", "2001:db8:a::/64"),
        ("[2001:db8:a::1]", "2001:db8:a::/64"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("not-an-ip", None),
        ("1.2.3.4/99", None),
        ("", None),
    ],
)
def test_parse_group(text: str, group: str | None) -> None:
    assert parse_group(text, 64) == group


def test_allowlist() -> None:
    allow = (net("10.0.0.0/8"), net("2001:db8:f::/48"))
    assert is_exempt(ip("10.200.0.1"), allow)
    assert is_exempt(ip("2001:db8:f:1::1"), allow)
    assert not is_exempt(ip("11.0.0.1"), allow)
    assert not is_exempt(ip("2001:db8:e::1"), allow)
    assert not is_exempt(ip("::ffff:10.0.0.1"), allow)  # callers unwrap first (client_ip does)
    assert not is_exempt(ip("10.0.0.1"), ())


def test_escalation_doubles_then_caps() -> None:
    policy = Bans(duration=2, factor=2, max_duration=10)
    assert [ban_ms(policy, n) for n in range(1, 6)] == [2000, 4000, 8000, 10000, 10000]


def test_escalation_with_fractional_numbers() -> None:
    policy = Bans(duration=0.3, factor=1.5, max_duration=1)
    assert [ban_ms(policy, n) for n in range(1, 5)] == [300, 450, 675, 1000]


@given(
    st.floats(0.001, 1e6),
    st.floats(1.0, 100.0),
    st.floats(0.0, 1e6),
    st.integers(1, 100_000),
)
def test_escalation_is_bounded_monotonic_and_never_raises(
    duration: float, factor: float, extra: float, n: int
) -> None:
    policy = Bans(duration=duration, factor=factor, max_duration=duration + extra)
    length = ban_ms(policy, n)
    assert math.ceil(round(duration * 1000, 3)) <= length <= math.ceil(round((duration + extra) * 1000, 3))
    assert ban_ms(policy, n + 1) >= length
    assert ban_ms(policy, 1) == math.ceil(round(duration * 1000, 3))


@pytest.mark.parametrize(("left", "header"), [(0.001, 1), (1.0, 1), (1.01, 2), (7.9, 8), (8.0, 8)])
def test_retry_after_is_a_ceiling_of_at_least_one(left: float, header: int) -> None:
    assert retry_after(left) == header


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_learns_and_forgets_at_the_end_of_the_ban() -> None:
    clock = Clock()
    cache = BanCache(clock)
    assert not cache and cache.seconds_left("1.2.3.4") is None
    cache.learn("1.2.3.4", 2.0, 1)
    assert len(cache) == 1
    clock.now += 1.5
    assert cache.seconds_left("1.2.3.4") == pytest.approx(0.5)
    clock.now += 0.5
    assert cache.seconds_left("1.2.3.4") is None
    assert not cache


def test_cache_sync_replaces_but_keeps_news_learned_since_it_began() -> None:
    clock = Clock()
    cache = BanCache(clock)
    cache.learn("old", 10, 1)  # lifted elsewhere: the sync no longer lists it
    clock.now += 0.5
    started = clock.now
    clock.now += 0.01
    cache.learn("fresh", 5, 1)  # imposed here while the sync was in flight
    cache.replace([KnownBan("remote", 3, 2)], started)
    assert cache.seconds_left("old") is None
    assert cache.seconds_left("fresh") == pytest.approx(5)
    assert cache.seconds_left("remote") == pytest.approx(3)
    assert {ban.group: ban.bans for ban in cache.snapshot()} == {"fresh": 1, "remote": 2}


def test_cache_sync_does_not_bring_back_a_ban_lifted_while_it_ran() -> None:
    clock = Clock()
    cache = BanCache(clock)
    cache.learn("g", 10, 1)
    started = clock.now
    clock.now += 0.01
    cache.lift("g")  # the sync read the store before the lift
    cache.replace([KnownBan("g", 9.99, 1)], started)
    assert cache.seconds_left("g") is None
    # a later sync that still lists it (imposed again) is believed
    clock.now += 1
    cache.replace([KnownBan("g", 4, 2)], clock.now)
    assert cache.seconds_left("g") == pytest.approx(4)


def test_cache_keeps_a_ban_it_imposed_until_the_index_confirms_it() -> None:
    """Its index write failed: the next sync must not let the client back in early; once the
    index has listed it, the index decides (a lift elsewhere reaches this replica)."""
    now = [0.0]
    cache = BanCache(lambda: now[0])
    cache.learn("1.2.3.4", 10.0, 1, imposed=True)
    cache.learn("5.6.7.8", 10.0, 1)  # learned from someone else's news
    now[0] = 1.0
    cache.replace([], sync_started=1.0)
    assert cache.seconds_left("1.2.3.4") == pytest.approx(9.0)
    assert cache.seconds_left("5.6.7.8") is None
    now[0] = 2.0
    cache.replace([KnownBan("1.2.3.4", 8.0, 1)], sync_started=2.0)  # confirmed
    now[0] = 3.0
    cache.replace([], sync_started=3.0)  # lifted elsewhere
    assert cache.seconds_left("1.2.3.4") is None
    cache.learn("9.9.9.9", 1.0, 1, imposed=True)
    now[0] = 4.5
    cache.replace([], sync_started=4.5)
    assert len(cache) == 0  # an unconfirmed ban still ends when it ends


@given(
    threads=st.integers(1, 16),
    told=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
    extra=st.lists(st.floats(0.0, 3.0), min_size=40, max_size=200),
    arrivals=st.lists(st.floats(0.0, 0.3), min_size=40, max_size=200),
)
def test_clients_that_wait_as_told_are_never_early(
    threads: int, told: float, extra: list[float], arrivals: list[float]
) -> None:
    """Up to `tolerance` threads sharing one IP and key, each waiting at least its told wait
    (plus any extra) after each refusal, in any interleaving: never an early return."""
    clock = Clock()
    ledger = ReturnLedger(clock)
    ready = [clock.now + arrivals[i % len(arrivals)] for i in range(threads)]  # when each thread comes
    for n in range(200):
        thread = min(range(threads), key=ready.__getitem__)
        clock.now = ready[thread]
        assert not ledger.refused("1.2.3.4", ("key", "/v1", 1), told, tolerance=16)
        ready[thread] = clock.now + told + extra[n % len(extra)]


@pytest.mark.parametrize(("rate", "told", "early_from"), [(50.0, 0.5, 25), (20.0, 1.0, 16), (10.0, 2.0, 16)])
def test_a_client_coming_back_faster_than_told_is_early_after_tolerance(
    rate: float, told: float, early_from: int
) -> None:
    """r refusals per second against a told wait w hold r*w running waits: past `tolerance`
    (16) every further refusal is early. 10/s against Retry-After 2 s is 20 > 16. (At 50/s the
    first 25 fall in the streak's first half second, FIRST_BURST.)"""
    clock = Clock()
    ledger = ReturnLedger(clock)
    early = []
    for n in range(60):
        clock.now = n / rate
        early.append(ledger.refused("1.2.3.4", ("key", "/v1", 1), told, tolerance=16))
    assert early[:early_from] == [False] * early_from
    assert all(early[early_from:])


def test_below_tolerance_over_the_wait_a_fast_client_is_not_early() -> None:
    """The rule's limit, stated: 10/s against a 0.5 s wait holds 5 running waits, like 5 honest
    threads; it is not early with tolerance 16 (it is with tolerance 4)."""
    for tolerance, expected in ((16, False), (4, True)):
        clock = Clock()
        ledger = ReturnLedger(clock)
        early = []
        for _ in range(50):
            early.append(ledger.refused("1.2.3.4", ("key", "/v1", 2), 0.5, tolerance=tolerance))
            clock.now += 0.1
        assert any(early) is expected


def test_early_returns_are_counted_per_ip_key_route_and_kind() -> None:
    clock = Clock()
    ledger = ReturnLedger(clock)
    for _ in range(3):
        assert not ledger.refused("1.2.3.4", ("k1", "/a", 1), 5.0, tolerance=3)
    clock.now += FIRST_BURST  # past the streak's first burst
    assert ledger.refused("1.2.3.4", ("k1", "/a", 1), 5.0, tolerance=3)
    assert not ledger.refused("1.2.3.5", ("k1", "/a", 1), 5.0, tolerance=3)
    assert not ledger.refused("1.2.3.4", ("k2", "/a", 1), 5.0, tolerance=3)
    assert not ledger.refused("1.2.3.4", ("k1", "/b", 1), 5.0, tolerance=3)
    assert not ledger.refused("1.2.3.4", ("k1", "/a", 2), 5.0, tolerance=3)
    clock.now += 5.0 - FIRST_BURST  # every told wait has run out: the next comes back in time
    assert not ledger.refused("1.2.3.4", ("k1", "/a", 1), 5.0, tolerance=3)
    assert ReturnLedger(clock).refused("1.2.3.4", ("k", "/", 1), 5.0, tolerance=0)  # 0: every 429 strikes


@pytest.mark.parametrize("size", [17, 40, 600])
def test_a_first_burst_of_any_size_is_not_early(size: int) -> None:
    """A client's first burst (an asyncio.gather of `size` requests on a 2-slot key) arrives
    before it could read one answer: no refusal in it came back. Before: every refusal past
    `tolerance` was early, and one gather of 40 banned the IP (20 strikes)."""
    clock = Clock()
    ledger = ReturnLedger(clock)
    for n in range(size):
        clock.now = n * (0.3 / size)  # all sent within 0.3 s
        assert not ledger.refused("1.2.3.4", ("key", "/v1", 2), 0.5, tolerance=16)


def test_past_the_first_burst_a_client_that_keeps_coming_is_early() -> None:
    """The burst's waits still count: the same client sending on, past FIRST_BURST, without
    waiting, is early from its first refusal there; after a quiet `within` a new streak starts
    with its own first burst."""
    clock = Clock()
    ledger = ReturnLedger(clock)
    for _ in range(40):
        assert not ledger.refused("1.2.3.4", ("key", "/v1", 1), 50.0, tolerance=16, quiet=60.0)
    clock.now += FIRST_BURST
    assert ledger.refused("1.2.3.4", ("key", "/v1", 1), 50.0, tolerance=16, quiet=60.0)
    clock.now += 30.0  # not quiet long enough: the same streak, the waits (50 s) still running
    assert ledger.refused("1.2.3.4", ("key", "/v1", 1), 50.0, tolerance=16, quiet=60.0)
    clock.now += 60.0  # quiet for the ban window: a new streak (the old waits have ended too)
    for _ in range(40):
        assert not ledger.refused("1.2.3.4", ("key", "/v1", 1), 50.0, tolerance=16, quiet=60.0)
    # tolerance 0 keeps its meaning: every 429 a strike, the first burst too
    assert ReturnLedger(clock).refused("1.2.3.5", ("key", "/v1", 1), 10.0, tolerance=0)


def test_the_ledger_is_bounded_by_scopes_and_tolerance() -> None:
    """An attacker rotating keys or IPs cannot grow it: at most max_entries scopes of at most
    `tolerance` waits each."""
    clock = Clock()
    ledger = ReturnLedger(clock, max_entries=100)
    for n in range(10_000):
        ledger.refused(f"10.0.{n // 256}.{n % 256}", ("key", "/", 1), 60.0, tolerance=16)
        clock.now += 0.001
    assert len(ledger) <= 100
    for _ in range(1000):
        ledger.refused("1.2.3.4", ("key", "/", 1), 60.0, tolerance=16)
    assert len(ledger._scopes[("1.2.3.4", ("key", "/", 1))].waits) == 16
