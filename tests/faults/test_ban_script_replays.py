"""Ban scripts under a lost reply: the strike or unban command reaches Redis, runs, and the
connection dies before the reply (a private redis-server behind the fault proxy). Whatever the
transport does next (redis-py re-sends the pipeline once on a new connection; a transport that
never re-sends fails the call), Redis must hold the strikes once, a ban imposed by the lost
call must still reach the index, and a lift must stay a lift.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config.model import Bans
from gateway.store.bans import BANNED_NOW, NOT_BANNED
from gateway.store.base import StoreError
from gateway.store.redis import RedisStore
from gateway.store.redis_bans import RedisBanStore, group_keys
from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

POLICY = Bans(strikes=4, within=60, duration=30, factor=2, max_duration=120, remember=600)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CuttingProxy(FaultProxy):
    def cut(self) -> None:
        """Reset every open connection and relay again, in one step on the proxy's loop (a
        client reconnecting at once must find a relaying proxy)."""

        async def cut() -> None:
            self.mode = "pass"
            for link in list(self._links):
                link.abort(reset=True)
            self._links.clear()

        self._call(cut())


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateRedis]:
    with private_redis() as started:
        yield started


@pytest.fixture
def proxy(server: PrivateRedis) -> Iterator[CuttingProxy]:
    with server.client() as direct:
        direct.flushall()
    with CuttingProxy(server.port) as started:
        yield started


async def lose_the_reply(proxy: CuttingProxy, call: Any) -> tuple[Any, BaseException | None, int]:
    """Run `call` with its reply lost after Redis ran it; (result, error, EVALSHAs sent)."""
    proxy.set_mode("drop_replies")
    before = proxy.delivered[b"EVALSHA"]
    task = asyncio.ensure_future(call)
    for _ in range(200):
        if proxy.delivered[b"EVALSHA"] > before:
            break
        await asyncio.sleep(0.005)
    assert proxy.delivered[b"EVALSHA"] > before, "the command never reached Redis"
    await asyncio.sleep(0.05)  # Redis has run it; its reply was dropped
    await asyncio.get_running_loop().run_in_executor(None, proxy.cut)
    try:
        return await task, None, proxy.delivered[b"EVALSHA"] - before
    except StoreError as exc:
        return None, exc, proxy.delivered[b"EVALSHA"] - before


async def opened(proxy: CuttingProxy) -> tuple[RedisStore, RedisBanStore]:
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", prefix="rp", timeout=2.0, lease=10.0)
    await store.start()
    bans = RedisBanStore(store, prefix="rp")
    # every script loaded, connection warm: a NOSCRIPT would be a re-send of its own
    await bans.strike(POLICY, [("192.0.2.1", (1, 0, 0))])
    assert not await bans.lift("192.0.2.1")
    assert await bans.active() == []
    return store, bans


async def test_a_replayed_strike_counts_once_and_its_ban_reaches_the_index(
    proxy: CuttingProxy, server: PrivateRedis
) -> None:
    store, bans = await opened(proxy)
    direct = server.client()
    strikes_key, _ = group_keys("rp", "203.0.113.7")
    try:
        verdicts, error, sent = await lose_the_reply(proxy, bans.strike(POLICY, [("203.0.113.7", (1, 1, 0))]))
        assert direct.zcard(strikes_key) == 2  # never 4, however often it was sent
        if error is None:  # re-sent (redis-py): the replay answered what the first run decided
            assert sent == 2
            [verdict] = verdicts
            assert (verdict.status, verdict.strikes) == (NOT_BANNED, 2)
        else:
            assert sent == 1
        # the strikes that reach the limit, with the reply lost again
        verdicts, error, sent = await lose_the_reply(proxy, bans.strike(POLICY, [("203.0.113.7", (0, 0, 2))]))
        if error is None:
            [verdict] = verdicts
            assert (verdict.status, verdict.bans, verdict.kinds) == (BANNED_NOW, 1, (1, 1, 2))
            # "banned now", not "already banned": the ban was published to the other replicas
            assert [(b.group, b.kinds) for b in await bans.active()] == [("203.0.113.7", (1, 1, 2))]
        assert direct.exists(strikes_key) == 0 and direct.hget(group_keys("rp", "203.0.113.7")[1], "bans") == b"1"
    finally:
        direct.close()
        await store.aclose()


async def test_a_replayed_lift_answers_as_the_first_and_lifts_once(proxy: CuttingProxy, server: PrivateRedis) -> None:
    store, bans = await opened(proxy)
    direct = server.client()
    try:
        [verdict] = await bans.strike(POLICY, [("198.51.100.1", (4, 0, 0))])
        assert verdict is not None and verdict.status == BANNED_NOW
        lifted, error, sent = await lose_the_reply(proxy, bans.lift("198.51.100.1"))
        if error is None:
            assert lifted is True  # the replay still says it was banned
        assert await bans.active() == []
        assert not direct.exists(*group_keys("rp", "198.51.100.1"))
        [after] = await bans.strike(POLICY, [("198.51.100.1", (1, 0, 0))])
        assert after is not None and (after.status, after.strikes) == (NOT_BANNED, 1)  # pardoned
    finally:
        direct.close()
        await store.aclose()
