"""BanGuard: the hot-path ban check reads only the local cache; strikes are batched off the
critical path; replicas learn each other's bans and lifts by syncing; a failing ban store
never fails a caller and never drops the bans already known."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

import pytest

from gateway.admission.bans import CONCURRENCY, FIRST_BURST, RATE, StrikeCounts
from gateway.ban_guard import DECIDING, BanGuard
from gateway.config.model import Bans
from gateway.metrics import Metrics, MetricsObserver
from gateway.store.bans import ActiveBan, MemoryBanStore, StrikeVerdict
from gateway.store.base import StoreError
from gateway.store.redis import RedisStore
from gateway.store.redis_bans import RedisBanStore

pytestmark = pytest.mark.anyio

POLICY = Bans(strikes=3, within=10, duration=2, factor=2, max_duration=8, remember=60,
              allow=(ipaddress.ip_network("10.0.0.0/8"),))
ip = ipaddress.ip_address


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CountingStore:
    """A MemoryBanStore that counts calls, or fails every call when `failing`."""

    def __init__(self) -> None:
        self.inner = MemoryBanStore()
        self.strike_calls: list[list[tuple[str, StrikeCounts]]] = []
        self.active_calls = 0
        self.failing = False

    async def strike(self, policy: Bans, batch: Sequence[tuple[str, StrikeCounts]]) -> list[StrikeVerdict | None]:
        self.strike_calls.append(list(batch))
        if self.failing:
            raise StoreError("down")
        return await self.inner.strike(policy, batch)

    async def active(self) -> list[ActiveBan]:
        self.active_calls += 1
        if self.failing:
            raise StoreError("down")
        return await self.inner.active()

    async def lift(self, group: str) -> bool:
        if self.failing:
            raise StoreError("down")
        return await self.inner.lift(group)


def value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_strikes_of_one_tick_go_in_one_batch_and_ban() -> None:
    store, metrics = CountingStore(), Metrics()
    guard = BanGuard(store, metrics, lambda: POLICY)
    for _ in range(3):
        guard.strike(ip("203.0.113.7"), POLICY)
    guard.strike(ip("2001:db8:a::1"), POLICY)
    guard.strike(ip("2001:db8:a::2"), POLICY)  # same /64
    # nothing decided yet: the next request of a struck client waits for the verdict
    assert guard.retry_after(ip("203.0.113.7"), POLICY) == DECIDING
    assert guard.retry_after(ip("2001:db8:a::9"), POLICY) == DECIDING
    assert guard.retry_after(ip("203.0.113.8"), POLICY) is None  # no strikes: passes at once
    assert await guard.verdict(ip("203.0.113.7"), POLICY) == 2
    assert await guard.verdict(ip("2001:db8:a::9"), POLICY) is None  # 2 strikes of 3
    assert store.strike_calls == [[("203.0.113.7", (3, 0, 0)), ("2001:db8:a::/64", (2, 0, 0))]]
    assert guard.retry_after(ip("203.0.113.7"), POLICY) == 2
    assert guard.retry_after(ip("203.0.113.8"), POLICY) is None
    assert guard.retry_after(ip("2001:db8:a::9"), POLICY) is None  # 2 strikes of 3
    assert value(metrics, "gateway_bans_total") == 1
    assert value(metrics, "gateway_banned_ips") == 1


async def test_ban_check_costs_no_store_call() -> None:
    store = CountingStore()
    guard = BanGuard(store, Metrics(), lambda: POLICY)
    guard.strike(ip("203.0.113.7"), POLICY)
    guard.strike(ip("203.0.113.7"), POLICY)
    guard.strike(ip("203.0.113.7"), POLICY)
    await guard.flush()
    calls = (len(store.strike_calls), store.active_calls)
    for _ in range(100):
        assert guard.retry_after(ip("203.0.113.7"), POLICY) == 2
        assert guard.retry_after(ip("198.51.100.1"), POLICY) is None
    assert (len(store.strike_calls), store.active_calls) == calls


async def test_allowlisted_ips_are_never_struck_nor_refused() -> None:
    store = CountingStore()
    guard = BanGuard(store, Metrics(), lambda: POLICY)
    for _ in range(10):
        guard.strike(ip("10.1.2.3"), POLICY)
    await guard.flush()
    assert store.strike_calls == []
    # banned before the allowlist said otherwise (e.g. a reload): still let through
    await store.inner.strike(POLICY, [("10.1.2.3", (3, 0, 0))])
    await guard.sync()
    assert guard.retry_after(ip("10.1.2.3"), POLICY) is None
    stricter = Bans(strikes=3, within=10, duration=2, factor=2, max_duration=8, remember=60)
    assert guard.retry_after(ip("10.1.2.3"), stricter) == 2


async def test_bans_off_means_no_strike_and_no_check() -> None:
    store = CountingStore()
    guard = BanGuard(store, Metrics(), lambda: None)
    guard.strike(ip("203.0.113.7"), None)
    await guard.flush()
    assert store.strike_calls == []
    assert guard.retry_after(ip("203.0.113.7"), None) is None


async def test_replicas_learn_bans_and_lifts_by_syncing() -> None:
    shared = CountingStore()
    a = BanGuard(shared, Metrics(), lambda: POLICY)
    b_metrics = Metrics()
    b = BanGuard(shared, b_metrics, lambda: POLICY, sync_interval=0.02)
    await b.start()
    try:
        for _ in range(3):
            a.strike(ip("203.0.113.7"), POLICY)
        await a.flush()
        assert a.retry_after(ip("203.0.113.7"), POLICY) == 2
        await asyncio.sleep(0.1)  # several sync rounds of b
        assert b.retry_after(ip("203.0.113.7"), POLICY) == 2
        assert value(b_metrics, "gateway_banned_ips") == 1
        assert value(b_metrics, "gateway_bans_total") == 0  # imposed by a, not b
        assert [e.group for e in await b.list_active()] == ["203.0.113.7"]
        assert await a.lift("203.0.113.7")
        assert a.retry_after(ip("203.0.113.7"), POLICY) is None  # at once where it was lifted
        await asyncio.sleep(0.1)
        assert b.retry_after(ip("203.0.113.7"), POLICY) is None
        assert value(b_metrics, "gateway_banned_ips") == 0
        assert not await a.lift("203.0.113.7")
    finally:
        await b.aclose()


async def test_a_replica_learns_a_ban_from_its_own_next_strike() -> None:
    shared = CountingStore()
    a = BanGuard(shared, Metrics(), lambda: POLICY)
    b = BanGuard(shared, Metrics(), lambda: POLICY)  # never syncs
    for _ in range(3):
        a.strike(ip("203.0.113.7"), POLICY)
    await a.flush()
    b.strike(ip("203.0.113.7"), POLICY)
    await b.flush()
    assert b.retry_after(ip("203.0.113.7"), POLICY) == 2


async def test_a_failing_store_keeps_known_bans_and_never_raises() -> None:
    store = CountingStore()
    guard = BanGuard(store, Metrics(), lambda: POLICY)
    for _ in range(3):
        guard.strike(ip("203.0.113.7"), POLICY)
    await guard.flush()
    store.failing = True
    guard.strike(ip("198.51.100.1"), POLICY)
    await guard.flush()  # dropped, not raised
    with pytest.raises(StoreError):
        await guard.sync()
    assert guard.retry_after(ip("203.0.113.7"), POLICY) == 2
    with pytest.raises(StoreError):
        await guard.lift("203.0.113.7")
    await guard.aclose()


async def test_redis_ban_store_failures_count_as_bans_store_errors() -> None:
    metrics = Metrics()
    observer = MetricsObserver(metrics)
    dead = RedisStore("redis://127.0.0.1:1/0", prefix="t", timeout=0.2, lease=10, observer=observer)
    guard = BanGuard(RedisBanStore(dead, prefix="t", observer=observer), metrics, lambda: POLICY)
    loop = asyncio.get_running_loop()
    started = loop.time()
    guard.strike(ip("203.0.113.7"), POLICY)
    await guard.flush()
    with pytest.raises(StoreError):
        await guard.sync()
    assert loop.time() - started < 2.0  # bounded by the store budget
    assert value(metrics, "gateway_store_errors_total", {"operation": "bans"}) == 2
    await guard.aclose()
    await dead.aclose()


async def test_admin_group_parsing_follows_the_policy_prefix() -> None:
    guard = BanGuard(MemoryBanStore(), Metrics(), lambda: Bans(ipv6_prefix=48))
    assert guard.group_for("2001:db8:a:b::1") == "2001:db8:a::/48"
    assert guard.group_for("nonsense") is None
    off = BanGuard(MemoryBanStore(), Metrics(), lambda: None)
    assert off.group_for("2001:db8:a:b::1") == "2001:db8:a:b::/64"


async def test_only_429s_that_came_back_early_are_strikes_and_counted_by_kind() -> None:
    store, metrics = CountingStore(), Metrics()
    policy = Bans(strikes=3, within=10, duration=2, tolerance=2, concurrency_grace=0.5)
    now = [0.0]
    guard = BanGuard(store, metrics, lambda: policy, clock=lambda: now[0])
    client = ip("203.0.113.7")
    # two threads told to wait 2 s: not early; a third refusal while both still wait is (once
    # past the first burst: FIRST_BURST)
    assert not guard.refused(client, policy, "key", "/v1", RATE, 2)
    assert not guard.refused(client, policy, "key", "/v1", RATE, 2)
    now[0] = FIRST_BURST
    assert guard.refused(client, policy, "key", "/v1", RATE, 2)
    now[0] = 2.5  # the told waits ran out: back in time
    assert not guard.refused(client, policy, "key", "/v1", RATE, 2)
    # concurrency refusals tell `concurrency_grace` (0.5 s)
    assert not guard.refused(client, policy, "key", "/v1", CONCURRENCY, None)  # the streak begins
    now[0] = 2.9
    assert not guard.refused(client, policy, "key", "/v1", CONCURRENCY, None)
    assert not guard.refused(client, policy, "key", "/v1", CONCURRENCY, None)  # 2 waits, but the first burst
    now[0] = 2.5 + FIRST_BURST
    assert guard.refused(client, policy, "key", "/v1", CONCURRENCY, None)  # 2 waits still running
    now[0] = 4.0
    assert not guard.refused(client, policy, "key", "/v1", CONCURRENCY, None)
    guard.strike(client, policy)  # a 401
    await guard.flush()
    assert store.strike_calls == [[("203.0.113.7", (1, 1, 1))]]
    assert [e.kinds for e in await guard.list_active()] == [(1, 1, 1)]
    for kind, count in (("unauthorized", 1), ("rate", 1), ("concurrency", 1)):
        assert value(metrics, "gateway_ban_strikes_total", {"kind": kind}) == count
    assert not guard.refused(ip("10.0.0.1"), policy, "key", "/v1", RATE, 2)  # allowlisted: never


async def test_a_struck_clients_next_request_waits_for_the_verdict() -> None:
    """Every strike takes effect before the next answer to that client: its ban check waits
    for the verdict (then 403 or pass); a client without undecided strikes never waits; a
    failed batch lets the client through."""
    store = CountingStore()
    guard = BanGuard(store, Metrics(), lambda: POLICY)
    client = ip("203.0.113.7")
    guard.strike(client, POLICY)
    guard.strike(client, POLICY)
    assert guard.retry_after(client, POLICY) == DECIDING
    assert await guard.verdict(client, POLICY) is None  # 2 of 3: passes
    assert guard.retry_after(client, POLICY) is None  # decided: no wait any more
    guard.strike(client, POLICY)  # the store knows 2: this one reaches 3
    assert guard.retry_after(client, POLICY) == DECIDING
    assert await guard.verdict(client, POLICY) == 2
    assert len(store.strike_calls) == 2
    other = ip("198.51.100.1")
    for _ in range(3):
        guard.strike(other, POLICY)
    store.failing = True
    assert guard.retry_after(other, POLICY) == DECIDING
    assert await guard.verdict(other, POLICY) is None
    assert guard.retry_after(other, POLICY) is None


async def test_a_ban_whose_index_write_failed_stays_on_the_replica_that_imposed_it() -> None:
    class NoIndex(CountingStore):
        async def active(self) -> list[ActiveBan]:
            return []  # the index never got it

    store = NoIndex()
    guard = BanGuard(store, Metrics(), lambda: POLICY)
    for _ in range(3):
        guard.strike(ip("203.0.113.7"), POLICY)
    await guard.flush()
    await guard.sync()
    assert guard.retry_after(ip("203.0.113.7"), POLICY) == 2
