"""Issue 18 under a lost reply, on both transports: an admission of cost 5 holding 2 slots
whose reply is cut after admit.lua ran leaves Redis holding exactly what its caller was told
(admitted once: 5 log units, 2 slot members, 5 quota units; or, told "error" after the resend
was cut too, nothing, taken back by undo.lua), and a settlement whose reply is cut, then sent
again by the caller as well, applies once."""

from __future__ import annotations

import asyncio

import pytest

from gateway.store.base import Charge, QuotaBucket, RateBucket, Settlement, SlotBucket, StoreError, weighted_lease
from gateway.store.redis import RedisStore
from tests.faults.test_replays import LEASE, TIMEOUT, TRANSPORTS, store_url
from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


def plan(tag: str) -> tuple[list[RateBucket], list[SlotBucket], list[QuotaBucket]]:
    return (
        [RateBucket(f"t:{{{tag}}}:r:credits", 100, 60_000, counts_cost=True),
         RateBucket(f"t:{{{tag}}}:a:credits", 100, 60_000, exact=False, counts_cost=True)],
        [SlotBucket(f"t:{{{tag}}}:s:browsers", 4)],
        [QuotaBucket(f"t:{{{tag}}}:q:monthly", 1000, "month")],
    )


def held(server: PrivateRedis, tag: str) -> tuple[list[bytes], list[bytes], int, int]:
    """(log members, slot members, counter count, quota used) as Redis holds them."""
    direct = server.client()
    rates, slots, quotas = plan(tag)
    return (
        sorted(direct.zrange(rates[0].key, 0, -1)),
        sorted(direct.zrange(slots[0].key, 0, -1)),
        int(direct.hget(rates[1].key, "c") or 0),
        int(direct.hget(quotas[0].key, "u") or 0),
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_weighted_costly_admission_whose_reply_was_lost_is_held_once(
    server: PrivateRedis, proxy: FaultProxy, transport: str
) -> None:
    store = RedisStore(store_url(proxy.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    rates, slots, quotas = plan("once")
    lease = weighted_lease("req", 2)
    try:
        await store.check_ready()
        before = proxy.delivered[b"EVALSHA"]
        proxy.set_mode("cut_replies", cuts=1)
        result = await store.admit(rates, slots, lease, quotas=quotas, charge=Charge(5, 2))
        sent = proxy.delivered[b"EVALSHA"] - before
        proxy.set_mode("pass")
        state = held(server, "once")
        store.release(slots, lease)
        await store.flush()
        released = held(server, "once")
    finally:
        await store.aclose()
    assert proxy.cuts_done == 1 and sent == 2  # it ran, its reply was lost, it was sent once more
    assert result.admitted and result.rate_counts == [0, 0] and result.quota_counts == [0]
    units = sorted([lease.encode()] + [f"{lease}#{n}".encode() for n in range(2, 6)])
    assert state == (units, sorted([lease.encode(), f"{lease}#2".encode()]), 5, 5)
    assert released == (units, [], 5, 5)  # the release frees both slots; the charge stays


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_weighted_costly_admission_told_error_leaves_nothing(
    server: PrivateRedis, proxy: FaultProxy, transport: str
) -> None:
    store = RedisStore(store_url(proxy.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    rates, slots, quotas = plan("undo")
    try:
        await store.check_ready()
        # Something held before, which the undo must not touch.
        assert (await store.admit(rates, slots, "earlier", quotas=quotas, charge=Charge(3))).admitted
        proxy.set_mode("cut_replies", cuts=2)  # the admission and its resend: told "error"
        with pytest.raises(StoreError):
            await store.admit(rates, slots, weighted_lease("lost", 2), quotas=quotas, charge=Charge(5, 2))
        proxy.set_mode("pass")
        for _ in range(40):  # the undo goes out at once after a lost connection
            state = held(server, "undo")
            if state[3] == 3:
                break
            await asyncio.sleep(0.05)
        store.release(slots, "earlier")
        await store.flush()
    finally:
        await store.aclose()
    assert proxy.cuts_done == 2
    assert state == ([b"earlier", b"earlier#2", b"earlier#3"], [b"earlier"], 3, 3)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_settlement_sent_again_applies_once(server: PrivateRedis, proxy: FaultProxy, transport: str) -> None:
    store = RedisStore(store_url(proxy.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    rates, slots, quotas = plan("settle")
    lease = weighted_lease("req", 2)
    try:
        await store.check_ready()
        result = await store.admit(rates, slots, lease, quotas=quotas, charge=Charge(5, 2))
        refund = Settlement(tuple(rates), tuple(quotas), 5, 2, result.now_ms)
        before = proxy.delivered[b"EVALSHA"]
        proxy.set_mode("cut_replies", cuts=1)  # settle.lua's reply: the store sends it once more
        store.release(slots, lease, settlement=refund)
        await store.flush()  # ends with the cut; the resend is queued behind it
        await store.flush()
        proxy.set_mode("pass")
        sent = proxy.delivered[b"EVALSHA"] - before
        store.release(slots, lease, settlement=refund)  # and the caller sends it again too
        await store.flush()
        state = held(server, "settle")
    finally:
        await store.aclose()
    assert proxy.cuts_done == 1 and sent == 2
    assert state == (sorted([lease.encode(), f"{lease}#2".encode()]), [], 2, 2)
