"""The connection bounds' pure parts (gateway/connection_limits.py): the census, who counts as
one client, the default total, the limits following the config, the throttled log line and
the open-file limit raised at start. Real floods against a real gateway are in
tests/faults/test_connection_floods.py."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import resource
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.loader import load_config_text
from gateway.config.model import Bans, Config, Identity, default_per_client
from gateway.connection_limits import (
    LOG_EVERY,
    MAX_LINGERING,
    PER_CLIENT,
    TOTAL,
    ConnectionCensus,
    ConnectionGuard,
    ConnectionLimits,
    OverLimit,
    client_group,
    default_total,
    limits_following,
)

LIMITS = ConnectionLimits(total=5, per_client=2)


def test_a_client_gets_its_bound_and_the_next_one_is_refused_uncounted() -> None:
    census = ConnectionCensus()
    census.enter("10.0.0.1", LIMITS)
    census.enter("10.0.0.1", LIMITS)
    with pytest.raises(OverLimit) as over:
        census.enter("10.0.0.1", LIMITS)
    assert over.value.limit == PER_CLIENT
    assert census.open == 2 and census.held_by("10.0.0.1") == 2
    census.enter("10.0.0.2", LIMITS)  # another client is not affected
    census.leave("10.0.0.1")
    census.enter("10.0.0.1", LIMITS)  # a close gives the place back
    assert census.held_by("10.0.0.1") == 2


def test_the_total_bound_holds_for_every_client_and_uncounted_peers_too() -> None:
    census = ConnectionCensus()
    for group in ("a", "b", "c", "", ""):  # "" = counted only in the total (a trusted proxy)
        census.enter(group, LIMITS)
    for group in ("d", ""):
        with pytest.raises(OverLimit) as over:
            census.enter(group, LIMITS)
        assert over.value.limit == TOTAL
    assert census.open == 5 and census.held_by("d") == 0


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c", ""])), max_size=200))
def test_the_census_matches_a_plain_count_after_any_opens_and_closes(steps: list[tuple[bool, str]]) -> None:
    census = ConnectionCensus()
    open_now: list[str] = []
    for opening, group in steps:
        if opening:
            try:
                census.enter(group, LIMITS)
                open_now.append(group)
            except OverLimit:
                assert len(open_now) >= LIMITS.total or (group and open_now.count(group) >= LIMITS.per_client)
        elif group in open_now:
            census.leave(group)
            open_now.remove(group)
        assert census.open == len(open_now) <= LIMITS.total
        for name in "abc":
            assert census.held_by(name) == open_now.count(name) <= LIMITS.per_client
    for group in list(open_now):
        census.leave(group)
    assert census.open == 0 and census._by_client == {}  # nothing kept for clients that left


def test_who_counts_as_one_client() -> None:
    proxies = ConnectionLimits(total=9, per_client=9, uncounted=(ipaddress.ip_network("10.1.0.0/16"),))
    assert client_group("192.0.2.7", LIMITS) == "192.0.2.7"
    assert client_group(None, LIMITS) == ""  # no address (a Unix socket): the total only
    assert client_group("10.1.2.3", proxies) == ""  # a trusted proxy carries many clients
    assert client_group("10.2.0.1", proxies) == "10.2.0.1"
    # one IPv6 host holds its whole /64: counted as one client, as bans count it
    assert client_group("2001:db8:a:b::1", LIMITS) == client_group("2001:db8:a:b:ffff::9", LIMITS) == "2001:db8:a:b::/64"
    assert client_group("2001:db8:a:c::1", LIMITS) == "2001:db8:a:c::/64"
    wider = dataclasses.replace(LIMITS, ipv6_prefix=48)
    assert client_group("2001:db8:a:c::1", wider) == client_group("2001:db8:a:b::1", wider)
    assert client_group("::ffff:192.0.2.7", LIMITS) == "192.0.2.7"


def test_limits_come_from_the_config_and_follow_a_reload() -> None:
    config = Config(upstream=None, keys=(), plans={}, routes=())  # type: ignore[arg-type]
    current = [config]
    limits = limits_following(lambda: current[0], 777)
    assert limits() == ConnectionLimits(total=777, per_client=512)
    assert limits() is limits()  # made once per config
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    current[0] = dataclasses.replace(
        config, max_client_connections=50, max_connections_per_client=3,
        identity=Identity(trusted_proxies=proxies), bans=Bans(ipv6_prefix=56),
    )
    assert limits() == ConnectionLimits(total=50, per_client=3, uncounted=proxies, ipv6_prefix=56)


@pytest.mark.parametrize(("open_files", "pool", "total"), [
    (20_000, 512, 18_976),  # the file limit less the pool and the reserve
    (1024, 64, 448),
    (1024, 512, 256),  # a pool as large as what is left: clients and the pool share it
    (100, 64, 1),
])
def test_the_default_total_leaves_room_for_the_gateways_own_descriptors(open_files: int, pool: int, total: int) -> None:
    assert default_total(open_files, pool) == total


class _Handle:
    def __init__(self, cancel: Callable[[], None]) -> None:
        self.cancel = cancel


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0
        self.due: list[tuple[float, Callable[..., None], tuple[Any, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> _Handle:
        entry = (when, callback, args)
        self.due.append(entry)
        return _Handle(lambda: self.due.remove(entry) if entry in self.due else None)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        ready = [entry for entry in self.due if entry[0] <= self.now]
        self.due = [entry for entry in self.due if entry[0] > self.now]
        for _, callback, args in ready:
            callback(*args)


def test_a_flood_of_refusals_writes_one_line_now_and_one_summary_per_period(caplog: pytest.LogCaptureFixture) -> None:
    guard = ConnectionGuard(lambda: ConnectionLimits(total=1000, per_client=1))
    loop = FakeLoop()
    caplog.set_level(logging.WARNING, logger="gateway.client")
    guard.enter("192.0.2.1")

    def refuse(count: int) -> None:
        for _ in range(count):
            with pytest.raises(OverLimit):
                guard.enter("192.0.2.1")
            guard.log_refusals(loop)  # type: ignore[arg-type]

    refuse(1)
    refuse(999)
    assert len(caplog.records) == 1 and "refused 1 connection(s):" in caplog.records[0].getMessage()
    loop.advance(LOG_EVERY)
    assert len(caplog.records) == 2
    assert "refused 999 connection(s) in the last 10 s: 0 with all its 1000" in caplog.records[1].getMessage()
    assert "999 from a client address holding its 1 (the last: 192.0.2.1); 1 open now" in caplog.records[1].getMessage()
    loop.advance(LOG_EVERY * 3)  # nothing refused since: nothing written
    assert len(caplog.records) == 2
    refuse(1)  # a refusal after a quiet period is written at once again
    assert len(caplog.records) == 3


def test_the_summary_due_is_written_when_the_worker_stops(caplog: pytest.LogCaptureFixture) -> None:
    guard = ConnectionGuard(lambda: ConnectionLimits(total=1000, per_client=1))
    loop = FakeLoop()
    caplog.set_level(logging.WARNING, logger="gateway.client")
    guard.enter("192.0.2.1")
    for _ in range(4):
        with pytest.raises(OverLimit):
            guard.enter("192.0.2.1")
        guard.log_refusals(loop)  # type: ignore[arg-type]
    assert len(caplog.records) == 1  # the first at once; three wait for the period's summary
    loop.advance(1)
    guard.flush_log(loop)  # type: ignore[arg-type]  # the worker stopping before it is due
    assert len(caplog.records) == 2 and "refused 3 connection(s) in the last 1 s" in caplog.records[1].getMessage()
    guard.flush_log(loop)  # type: ignore[arg-type]
    loop.advance(LOG_EVERY)  # the cancelled timer writes nothing more
    assert len(caplog.records) == 2


def test_refused_connections_waiting_for_their_request_are_bounded() -> None:
    guard = ConnectionGuard(lambda: LIMITS)
    assert all(guard.may_linger() for _ in range(MAX_LINGERING))
    assert not guard.may_linger()
    guard.lingered()
    assert guard.may_linger()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_at_start() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = min(256, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    code = ("import resource; from gateway.connection_limits import raise_open_file_limit as r; "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             preexec_fn=lower).stdout.split()
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert printed == [str(soft), str(expected), str(expected)]


def _config(plans: str, keys: str = "") -> Config:
    return load_config_text(f"""
upstream: {{url: "http://127.0.0.1:9000"}}
keys:
  - {{id: a, key: a-key-for-tests, plan: p}}
{keys}
plans:
  p: {{limits: {plans}}}
routes:
  - {{path: /**, limits: []}}
""")


@pytest.mark.parametrize(("plans", "keys", "per_client"), [
    ("{rpm: {rate: 10/1m}}", "", 512),  # no concurrency limit: the floor
    ("{requests: {concurrency: 200}}", "", 512),
    ("{requests: {concurrency: 400}}", "", 800),  # the slots in flight and as many kept alive
    ("{requests: {concurrency: 10}}", "  - {id: b, key: b-key-for-tests, plan: p, limits: {requests: 900}}", 1800),
    ("{requests: {concurrency: 10}, preview: {concurrency: 5000, shadow: true}}", "", 512),  # never refuses
])
def test_the_default_per_client_bound_leaves_room_for_every_slot_a_key_can_hold(
    plans: str, keys: str, per_client: int
) -> None:
    config = _config(plans, keys)
    assert default_per_client(config) == per_client
    assert ConnectionLimits.from_config(config, 10_000).per_client == per_client
