"""The ban store contract (gateway/store/bans.py) on every backend: MemoryBanStore, and
RedisBanStore (strike.lua, ban_index.lua, unban.lua) on fakeredis and on a real redis-server.

Time is driven (the clock is sent to the scripts as ARGV) unless a test says otherwise. The
`backend` fixture's teardown checks that every Redis key the scripts wrote carries a TTL."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aredis
from redis.crc import key_slot

from gateway.admission.bans import ban_ms
from gateway.config.model import Bans
from gateway.store import scripts
from gateway.store.bans import (
    ALREADY_BANNED,
    BANNED_NOW,
    NOT_BANNED,
    ActiveBan,
    MemoryBanStore,
    StrikeVerdict,
)
from gateway.store.base import StoreError
from gateway.store.redis import RedisStore
from gateway.store.redis_bans import (
    RedisBanStore,
    decode_active,
    decode_strike,
    group_keys,
    index_key,
    lifted_key,
    strike_call,
)
from tests.store.conftest import Backend, DrivenClock, RecordingObserver
from tests.support.topologies import redis_cluster

pytestmark = pytest.mark.anyio

POLICY = Bans(strikes=3, within=10, duration=2, factor=2, max_duration=8, remember=60)


async def ban_store(backend: Backend, clock: DrivenClock | None) -> Any:
    if backend.is_redis:
        store = await backend.started(clock=clock)
        return RedisBanStore(store, prefix="t")
    return MemoryBanStore(clock) if clock is not None else MemoryBanStore()


async def strike(store: Any, group: str, weight: int = 1, policy: Bans = POLICY) -> Any:
    [verdict] = await store.strike(policy, [(group, (weight, 0, 0))])
    return verdict


async def test_strikes_up_to_the_threshold_ban(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    first = await strike(store, "1.2.3.4")
    second = await strike(store, "1.2.3.4")
    assert (first.status, first.strikes, second.status, second.strikes) == (NOT_BANNED, 1, NOT_BANNED, 2)
    assert not first.banned and first.ms_left == 0
    third = await strike(store, "1.2.3.4")
    assert third.status == BANNED_NOW and third.banned
    assert (third.ms_left, third.bans, third.strikes) == (2000, 1, 3)
    assert [(b.group, b.ms_left, b.bans) for b in await store.active()] == [("1.2.3.4", 2000, 1)]
    # other groups are untouched
    assert (await strike(store, "1.2.3.5")).strikes == 1


async def test_a_banned_group_records_nothing(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    await strike(store, "g", 3)
    clock.advance_ms(500)
    again = await strike(store, "g", 5)
    assert (again.status, again.ms_left, again.bans, again.strikes) == (ALREADY_BANNED, 1500, 1, 0)
    clock.advance_ms(1500)  # the ban is over and those 5 strikes were never counted
    after = await strike(store, "g")
    assert (after.status, after.strikes) == (NOT_BANNED, 1)
    assert await store.active() == []


async def test_strike_window_slides_exactly(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    await strike(store, "g")  # t0
    clock.advance_ms(4000)
    await strike(store, "g")  # t0+4s
    clock.advance_ms(6000)  # t0+10s: the first strike has just left (now - within, now]
    verdict = await strike(store, "g")
    assert (verdict.status, verdict.strikes) == (NOT_BANNED, 2)
    clock.advance_ms(3999)  # t0+13.999s: the second strike is still inside
    verdict = await strike(store, "g")
    assert verdict.status == BANNED_NOW


async def test_escalation_caps_and_is_forgotten_after_remember(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    lengths = []
    for _ in range(5):
        verdict = await strike(store, "g", 3)
        assert verdict.status == BANNED_NOW
        lengths.append((verdict.ms_left, verdict.bans))
        clock.advance_ms(verdict.ms_left)  # exactly when the ban ends
    assert lengths == [(2000, 1), (4000, 2), (8000, 3), (8000, 4), (8000, 5)]
    assert lengths == [(ban_ms(POLICY, n), n) for n in range(1, 6)]
    clock.advance_ms(60_000 - 1)  # still remembered (remember counts from the end of the last ban)
    assert (await strike(store, "g", 3)).bans == 6
    clock.advance_ms(8000 + 60_000)  # forgotten: back to the first duration
    verdict = await strike(store, "g", 3)
    assert (verdict.ms_left, verdict.bans) == (2000, 1)


async def test_one_batch_many_groups_and_weights(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    verdicts = await store.strike(POLICY, [("a", (1, 0, 0)), ("b", (3, 0, 0)), ("c", (50, 0, 0))])
    assert [(v.group, v.status, v.strikes) for v in verdicts] == [
        ("a", NOT_BANNED, 1), ("b", BANNED_NOW, 3), ("c", BANNED_NOW, 3),  # weight is capped at the threshold
    ]
    assert sorted(b.group for b in await store.active()) == ["b", "c"]


async def test_a_ban_keeps_the_strikes_by_kind_that_earned_it(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    policy = Bans(strikes=6, within=10, duration=2, factor=2, max_duration=8, remember=60)
    [first] = await store.strike(policy, [("g", (0, 2, 0))])
    clock.advance_ms(100)
    [second] = await store.strike(policy, [("g", (1, 0, 1))])
    assert (first.status, second.status, second.strikes) == (NOT_BANNED, NOT_BANNED, 4)
    clock.advance_ms(100)
    [banned] = await store.strike(policy, [("g", (0, 1, 5))])
    assert (banned.status, banned.strikes, banned.kinds) == (BANNED_NOW, 10, (1, 3, 6))
    [listed] = await store.active()
    assert (listed.group, listed.kinds) == ("g", (1, 3, 6))
    [again] = await store.strike(policy, [("g", (1, 0, 0))])
    assert (again.status, again.kinds) == (ALREADY_BANNED, (1, 3, 6))
    [capped] = await store.strike(policy, [("h", (0, 0, 50))])  # one call records at most `strikes`
    assert (capped.strikes, capped.kinds) == (6, (0, 0, 6))


async def test_active_drops_ended_bans(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    await strike(store, "short", 3)  # first ban: 2 s
    await strike(store, "long", 3)
    clock.advance_ms(1999)
    assert {b.group: b.ms_left for b in await store.active()} == {"short": 1, "long": 1}
    clock.advance_ms(1)  # both end exactly now
    assert await store.active() == []
    verdict = await strike(store, "long", 3)  # second ban: 4 s
    assert (verdict.status, verdict.ms_left) == (BANNED_NOW, 4000)
    clock.advance_ms(1)
    assert [(b.group, b.ms_left, b.bans) for b in await store.active()] == [("long", 3999, 2)]


async def test_lift_ends_the_ban_and_pardons(backend: Backend, clock: DrivenClock) -> None:
    store = await ban_store(backend, clock)
    assert not await store.lift("g")
    await strike(store, "g", 3)
    clock.advance_ms(2000)
    assert (await strike(store, "g", 3)).bans == 2
    await strike(store, "h", 3)
    assert await store.lift("g")
    assert [b.group for b in await store.active()] == ["h"]
    assert not await store.lift("g")
    after = await strike(store, "g", 3)  # the history went with the ban
    assert (after.status, after.ms_left, after.bans) == (BANNED_NOW, 2000, 1)


async def test_real_clock(backend: Backend) -> None:
    """No driven clock: Redis TIME (or time.monotonic) decides."""
    store = await ban_store(backend, None)
    verdict = await strike(store, "g", 3, Bans(strikes=3, within=10, duration=0.3, factor=2, max_duration=1))
    assert verdict.ms_left == 300
    [active] = await store.active()
    assert 0 < active.ms_left <= 300
    await asyncio.sleep(0.35)
    assert await store.active() == []


# -- Redis specifics ------------------------------------------------------------------------


def test_every_script_call_stays_in_one_hash_slot() -> None:
    """Redis Cluster: a strike touches only its group's keys, never an API-key or workspace key."""
    for group in ("1.2.3.4", "2001:db8:a::/64", "{k:x}", "a}b{c"):
        keys, _ = strike_call("gw", POLICY, group, (1, 0, 0), "id", "")
        assert len({scripts.hash_tag(key) for key in keys}) == 1
        assert scripts.hash_tag(keys[0]).startswith("ip:")
        assert keys == list(group_keys("gw", group))
        assert len({key_slot(key.encode()) for key in keys}) == 1
    assert scripts.hash_tag(index_key("gw")) == "bans"
    assert group_keys("gw", "1.2.3.4") != group_keys("gw", "1.2.3.5")


@pytest.mark.parametrize("engine", ["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def test_scripts_reload_after_script_flush(engine: str, request: pytest.FixtureRequest) -> None:
    if engine == "redis":
        url = request.getfixturevalue("redis_url")
        client = aredis.Redis.from_url(url)
        admin = aredis.Redis.from_url(url)
    else:
        server = fakeredis.FakeServer()
        client = fakeredis.FakeAsyncRedis(server=server)
        admin = fakeredis.FakeAsyncRedis(server=server)
    clock = DrivenClock()
    redis_store = RedisStore.from_client(client, prefix="t", timeout=1, lease=10, clock=clock)
    store = RedisBanStore(redis_store, prefix="t")
    try:
        await strike(store, "g")
        await admin.script_flush()  # a restart or failover loses the scripts
        assert (await strike(store, "g")).strikes == 2
        assert await store.active() == []
        assert await store.lift("g") is False
    finally:
        await redis_store.aclose()
        await admin.aclose()


async def test_failures_raise_store_error_and_are_counted() -> None:
    observer = RecordingObserver()
    dead = RedisStore("redis://127.0.0.1:1/0", prefix="t", timeout=0.2, lease=10, observer=observer)
    store = RedisBanStore(dead, prefix="t", observer=observer)

    for call in (store.strike(POLICY, [("g", (1, 0, 0))]), store.active(), store.lift("g")):
        with pytest.raises(StoreError):
            await call
    assert observer.errors["bans"] == 3
    await dead.aclose()


# -- differential: the same random story on every engine ------------------------------------


async def run_story(store: Any, clock: DrivenClock, seed: int) -> list[Any]:
    rng = random.Random(seed)
    policy = Bans(strikes=3, within=2, duration=1, factor=3, max_duration=5, remember=4)
    groups = ["a", "b", "2001:db8::/64"]
    seen: list[Any] = []
    for _ in range(60):
        op = rng.random()
        if op < 0.6:
            batch = [
                (g, (rng.randint(0, 2), rng.randint(0, 1), rng.randint(0, 2)))
                for g in rng.sample(groups, rng.randint(1, 3))
            ]
            verdicts = await store.strike(policy, batch)
            seen.append([(v.group, v.status, v.ms_left, v.bans, v.strikes, v.kinds) for v in verdicts])
        elif op < 0.7:
            seen.append(("lift", await store.lift(rng.choice(groups))))
        else:
            seen.append(sorted((b.group, b.ms_left, b.bans, b.kinds) for b in await store.active()))
        clock.advance_ms(rng.choice([0, 1, 250, 999, 1000, 1500, 3000]))
    return seen


@pytest.mark.parametrize("engine", ["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def test_memory_and_lua_agree_on_random_stories(engine: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url") if engine == "redis" else None
    for seed in range(8):
        memory_clock, lua_clock = DrivenClock(), DrivenClock()
        memory = await run_story(MemoryBanStore(memory_clock), memory_clock, seed)
        if url:
            client = aredis.Redis.from_url(url)
            await client.flushdb()
        else:
            client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        redis_store = RedisStore.from_client(client, prefix="t", timeout=1, lease=10, clock=lua_clock)
        try:
            lua = await run_story(RedisBanStore(redis_store, prefix="t"), lua_clock, seed)
        finally:
            await redis_store.aclose()
        assert memory == lua, f"seed {seed}"


@pytest.mark.redis
async def test_bans_on_a_redis_cluster() -> None:
    """Strike batches spread over every primary, the index in its own slot, NOSCRIPT after a
    failover-like SCRIPT FLUSH, and a TTL on every key."""
    with redis_cluster() as nodes:
        observer = RecordingObserver()
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes[:2])
        redis_store = RedisStore(url, prefix="t", timeout=0.5, lease=10.0, observer=observer)
        await redis_store.start()
        store = RedisBanStore(redis_store, prefix="t", observer=observer)
        groups = [f"198.51.100.{n}" for n in range(12)] + ["2001:db8:a::/64"]
        try:
            verdicts = await store.strike(POLICY, [(group, (3, 0, 0)) for group in groups])
            assert all(v is not None and v.status == BANNED_NOW for v in verdicts)
            assert sorted(b.group for b in await store.active()) == sorted(groups)
            for node in nodes:
                node.client().script_flush()
            again = await store.strike(POLICY, [(group, (1, 0, 0)) for group in groups])
            assert all(v is not None and v.status == ALREADY_BANNED for v in again)
            assert await store.lift(groups[0])
            assert len(await store.active()) == len(groups) - 1
            assert observer.errors == {}
        finally:
            await redis_store.aclose()
        for node in nodes:
            client = node.client()
            for key in client.scan_iter():
                assert client.pttl(key) > 0, key


def test_replies_meant_for_another_call_or_malformed_are_refused() -> None:
    assert decode_strike([b"id1", 2, 2000, 1, 5, 1, 3, 1], "g", "id1") == StrikeVerdict(
        "g", BANNED_NOW, 2000, 1, 5, (1, 3, 1))
    for reply in ([b"id2", 2, 2000, 1, 5, 0, 0, 0], [b"id1", 2, 2000], "OK", [b"id1", b"x", 0, 0, 0, 0, 0, 0]):
        with pytest.raises(StoreError):
            decode_strike(reply, "g", "id1")
    assert decode_active([b"1.2.3.4", 1500, 2, 0, 1, 0]) == [ActiveBan("1.2.3.4", 1500, 2, (0, 1, 0))]
    for reply in ([b"1.2.3.4", 1500, 2], None, [b"g", b"soon", 1, 0, 0, 0]):
        with pytest.raises(StoreError):
            decode_active(reply)


@pytest.mark.parametrize("engine", ["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def test_replayed_strike_and_unban_scripts_change_nothing_more(
    engine: str, request: pytest.FixtureRequest
) -> None:
    """A retry layer re-sending the very same EVALSHA (same call id) after a lost reply: the
    strike adds nothing twice, the one that banned answers "banned now" again (so its ban still
    reaches the index), and a replayed lift answers 1 again."""
    if engine == "redis":
        client = aredis.Redis.from_url(request.getfixturevalue("redis_url"))
        await client.delete(*group_keys("t", "g"), lifted_key("t", "g"))
    else:
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    strike_lua, unban_lua = scripts.load("strike"), scripts.load("unban")
    try:
        async def run(script: scripts.Script, keys: list[str], args: list[Any]) -> Any:
            return await client.eval(script.source, len(keys), *keys, *args)

        keys, args = strike_call("t", POLICY, "g", (1, 1, 0), "call-1", "1000")
        first = await run(strike_lua, keys, args)
        assert await run(strike_lua, keys, args) == first  # replayed: still 2 strikes
        assert decode_strike(first, "g", "call-1").strikes == 2
        keys, args = strike_call("t", POLICY, "g", (0, 0, 1), "call-2", "1001")
        banned = decode_strike(await run(strike_lua, keys, args), "g", "call-2")
        replayed = decode_strike(await run(strike_lua, keys, args[:4] + ["1002"] + args[5:]), "g", "call-2")
        assert (banned.status, banned.kinds) == (BANNED_NOW, (1, 1, 1))
        assert (replayed.status, replayed.ms_left, replayed.bans, replayed.kinds) == (BANNED_NOW, 1999, 1, (1, 1, 1))
        keys, other = strike_call("t", POLICY, "g", (1, 0, 0), "call-3", "1003")
        assert decode_strike(await run(strike_lua, keys, other), "g", "call-3").status == ALREADY_BANNED
        unban_keys = [*group_keys("t", "g"), lifted_key("t", "g")]
        assert await run(unban_lua, unban_keys, ["1004", "lift-1"]) == 1
        assert await run(unban_lua, unban_keys, ["1005", "lift-1"]) == 1  # replayed: same answer
        assert await run(unban_lua, unban_keys, ["1006", "lift-2"]) == 0  # a new lift: nothing banned
        assert await client.pttl(lifted_key("t", "g")) > 0
    finally:
        await client.aclose()
