"""A lost reply never turns into a lost slot or a double admission, on both transports.

The fault: the command reaches Redis and runs, then the connection is reset before its reply
gets back (tests/support/fault_proxy.py, mode `cut_replies`), or Redis stalls past
`store.timeout` (`DEBUG SLEEP`) so the caller gives up while its EVALSHA still waits in a
socket buffer and runs later. Under concurrent load, afterwards:

- every sliding-log entry in Redis belongs to a lease whose caller was told "admitted", and
  every lease told "admitted" has one (what clients were told is what Redis holds);
- no slot set keeps a live member once the releases have landed (at most one lease later);
- never more than N leases held at once, never more than L admitted per window;
- nothing was sent twice except what is safe to run twice (admit.lua by its lease id, ZREM).

Both transports: the pipelined connection (`redis://`) and redis-py, forced by a URL option
the pipelined client does not implement (what `rediss://`, Sentinel and Cluster use).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import redis

from gateway.store import scripts
from gateway.store.base import RateBucket, SlotBucket, StoreError
from gateway.store.redis import RedisStore
from gateway.store.redis_jobs import RedisJobStore
from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

TIMEOUT = 0.2
LEASE = 2.0
SLOTS = 4  # N
RATE = 1000  # L per minute: the load below reaches it midway, so both kinds of refusal happen
TRANSPORTS = ["pipelined", "redis-py"]


def store_url(port: int, transport: str) -> str:
    url = f"redis://127.0.0.1:{port}/0"
    # Any query option but db sends the URL to redis-py (gateway/store/pipelined.py, Endpoint).
    return url if transport == "pipelined" else url + "?client_name=gw-replays"


def buckets(tag: str) -> tuple[list[RateBucket], list[SlotBucket]]:
    return [RateBucket(f"t:{{{tag}}}:r:rpm", RATE, 60_000)], [SlotBucket(f"t:{{{tag}}}:s:req", SLOTS)]


@dataclass
class Load:
    """What each client was told, and what the clients saw together."""

    told: dict[str, str] = field(default_factory=dict)  # lease id -> admitted / refused / error
    held: int = 0
    max_held: int = 0

    def counts(self) -> Counter[str]:
        return Counter(self.told.values())


async def run_load(store: RedisStore, tag: str, *, clients: int, seconds: float) -> Load:
    rates, slots = buckets(tag)
    load = Load()
    end = time.monotonic() + seconds
    rng = random.Random(14)

    async def client(number: int) -> None:
        attempt = 0
        while time.monotonic() < end:
            lease_id = f"c{number}-{attempt}"
            attempt += 1
            try:
                result = await store.admit(rates, slots, lease_id)
            except StoreError:
                load.told[lease_id] = "error"
                await asyncio.sleep(0.005)
                continue
            if not result.admitted:
                load.told[lease_id] = "refused"
                await asyncio.sleep(0.005)
                continue
            load.told[lease_id] = "admitted"
            load.held += 1
            load.max_held = max(load.max_held, load.held)
            try:
                await asyncio.sleep(rng.uniform(0.001, 0.01))
            finally:
                load.held -= 1
                store.release(slots, lease_id)

    await asyncio.gather(*(client(number) for number in range(clients)))
    return load


async def settle(server: PrivateRedis, tag: str, load: Load) -> tuple[set[bytes], int]:
    """Wait (at most two leases: undo and release retries, then lease expiry) until Redis
    holds exactly the admitted leases' rate entries and no live slot; return what it holds."""
    rates, slots = buckets(tag)
    direct = server.client()
    admitted = {lease.encode() for lease, told in load.told.items() if told == "admitted"}
    deadline = time.monotonic() + 2 * LEASE + 1
    while True:
        entries = set(direct.zrange(rates[0].key, 0, -1))
        now_ms = int(direct.time()[0]) * 1000
        live = direct.zcount(slots[0].key, f"({now_ms}", "+inf")
        if (entries == admitted and live == 0) or time.monotonic() > deadline:
            return entries, live
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_replies_lost_after_the_command_ran(server: PrivateRedis, proxy: FaultProxy, transport: str) -> None:
    store = RedisStore(store_url(proxy.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    tag = f"cut-{transport}"
    try:
        proxy.set_mode("cut_replies", cuts=40)
        load_task = asyncio.create_task(run_load(store, tag, clients=24, seconds=4.0))
        # Heartbeats run through the cuts as well (renew.lua: replay-safe, never sent twice here).
        while not load_task.done():
            try:
                await store.renew()
            except StoreError:
                pass
            await asyncio.sleep(0.05)
        load = load_task.result()
        proxy.set_mode("pass")
        entries, live = await settle(server, tag, load)
    finally:
        await store.aclose()
    counts = load.counts()
    admitted = {lease.encode() for lease, told in load.told.items() if told == "admitted"}
    undone = set(server.client().zrange(scripts.undone_key(f"t:{{{tag}}}:r"), 0, -1))
    print(f"\n[{transport}] cuts={proxy.cuts_done} told={dict(counts)} max_in_flight={load.max_held}/{SLOTS} "
          f"rate_entries={len(entries)}/{RATE} undone={len(undone)}")
    assert proxy.cuts_done == 40  # the fault happened, 40 times
    assert counts["error"] > 0 and counts["refused"] > 0 and counts["admitted"] > 0
    assert load.max_held <= SLOTS
    assert entries == admitted, (
        f"told admitted but not in Redis: {sorted(admitted - entries)[:5]}; "
        f"in Redis but told refused/error: {sorted(entries - admitted)[:5]}"
    )
    assert len(entries) <= RATE
    assert live == 0
    errors = {lease.encode() for lease, told in load.told.items() if told == "error"}
    assert errors <= undone  # each error answer was undone by its lease id


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_redis_stalled_past_the_timeout_leaks_nothing(server: PrivateRedis, transport: str) -> None:
    """DEBUG SLEEP: callers time out while their EVALSHAs wait unread; Redis runs them when it
    wakes, possibly after their undo. The undone set makes those late runs take nothing."""
    store = RedisStore(store_url(server.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    tag = f"sleep-{transport}"
    try:
        load_task = asyncio.create_task(run_load(store, tag, clients=24, seconds=3.0))
        sleeper = redis.Redis(port=server.port, socket_timeout=5)
        for _ in range(3):
            await asyncio.sleep(0.5)
            await asyncio.to_thread(sleeper.execute_command, "DEBUG", "SLEEP", "0.6")
        load = await load_task
        entries, live = await settle(server, tag, load)
    finally:
        await store.aclose()
    counts = load.counts()
    late = int(server.client().zcard(scripts.undone_key(f"t:{{{tag}}}:r")))
    print(f"\n[{transport}] DEBUG SLEEP x3: told={dict(counts)} max_in_flight={load.max_held}/{SLOTS} "
          f"rate_entries={len(entries)} undone={late}")
    admitted = {lease.encode() for lease, told in load.told.items() if told == "admitted"}
    assert counts["error"] > 0  # the stalls cost answers...
    assert entries == admitted  # ...but nothing a client was not told about
    assert live == 0
    assert load.max_held <= SLOTS


async def test_admit_script_is_replay_safe_and_refuses_after_undo(server: PrivateRedis) -> None:
    """admit.lua run twice for one lease: the second run answers "admitted" and writes
    nothing; after undo.lua, the lease's entries are gone and a late run takes nothing."""
    direct = server.client()
    admit, undo = scripts.load("admit"), scripts.load("undo")
    rates = [RateBucket("t:{x}:r:rpm", 10, 60_000), RateBucket("t:{x}:a:rpm", 10, 60_000, exact=False)]
    slots = [SlotBucket("t:{x}:s:req", 1)]

    def run_admit(lease_id: str) -> scripts.AdmitResult:
        keys, args = scripts.admit_call(rates, slots, lease_id, "2000", "")
        return scripts.decode_admit(direct.eval(admit.source, len(keys), *keys, *args), lease_id, 2, 1)

    first = run_admit("lease-1")
    again = run_admit("lease-1")
    assert first.admitted and again.admitted
    assert again.rate_counts == first.rate_counts and again.slot_counts == first.slot_counts
    assert direct.zcard("t:{x}:r:rpm") == 1 and direct.zcard("t:{x}:s:req") == 1
    assert direct.hget("t:{x}:a:rpm", "c") == b"1"  # the counter did not count the replay
    assert not run_admit("lease-2").admitted  # the one slot is still lease-1's

    keys, args = scripts.undo_call(rates, slots, "lease-1", "2000", "", "60000")
    assert direct.eval(undo.source, len(keys), *keys, *args) == 1
    assert direct.eval(undo.source, len(keys), *keys, *args) == 0  # idempotent
    assert direct.zcard("t:{x}:r:rpm") == 0 and direct.zcard("t:{x}:s:req") == 0
    assert direct.hget("t:{x}:a:rpm", "c") == b"0"
    with pytest.raises(StoreError, match="after it was undone"):
        run_admit("lease-1")  # its EVALSHA landing late
    assert direct.zcard("t:{x}:r:rpm") == 0 and direct.zcard("t:{x}:s:req") == 0

    keys, args = scripts.undo_call(rates, slots, "lease-3", "2000", "", "60000")
    assert direct.eval(undo.source, len(keys), *keys, *args) == 0  # undone before it ran...
    with pytest.raises(StoreError, match="after it was undone"):
        run_admit("lease-3")  # ...so when it runs, it takes nothing
    assert direct.zcard("t:{x}:s:req") == 0
    assert run_admit("lease-4").admitted  # the slot is free for the next request


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_job_free_is_never_sent_twice(server: PrivateRedis, proxy: FaultProxy, transport: str) -> None:
    """job_free.lua through the generic script path: no retry layer re-sends it; the job store
    itself asks once more with the same end id (the script is idempotent by it, see
    test_job_store_faults.py), so exactly two EVALSHAs reach Redis and the caller gets an answer."""
    store = RedisStore(store_url(proxy.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    jobs = RedisJobStore(store, prefix="t")
    try:
        await store.renew()  # connections warm, nothing pending
        assert await jobs.end("job-0", "owner") is None  # job_free.lua loaded: the cut call runs
        before = proxy.delivered[b"EVALSHA"]
        proxy.set_mode("cut_replies", cuts=1)
        assert await jobs.end("job-1", "owner") is None  # no such job: nothing held, no error
        proxy.set_mode("pass")
        await asyncio.sleep(0.1)
        sent = proxy.delivered[b"EVALSHA"] - before
    finally:
        await store.aclose()
    assert proxy.cuts_done == 1
    assert sent == 2  # the lost call and the store's own replay by end id, nothing from a retry layer


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_admission_landing_after_its_undo_takes_nothing(
    server: PrivateRedis, proxy: FaultProxy, transport: str
) -> None:
    """The EVALSHAs are held back 1.5 s on their way to Redis (past the 0.2 s timeout); the
    callers are told "error" and their undos go out on a fresh connection that is not held
    back, once Redis answers the heartbeat's PING (every lease / 3), so every undo runs first.
    The admissions then land and must take nothing."""
    store = RedisStore(store_url(proxy.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    rates, slots = buckets("late")
    direct = server.client()
    try:
        await store.check_ready()  # connections open before the delay starts
        before = proxy.delivered[b"EVALSHA"]
        proxy.set_mode("latency", latency=1.5)
        attempts = [asyncio.create_task(store.admit(rates, slots, f"late-{n}")) for n in range(SLOTS)]
        await asyncio.sleep(0.05)  # read by the proxy, on their way
        proxy.set_mode("pass")  # what is sent from now on (the undos) is not held back
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        await asyncio.sleep(2.0)  # the undos, then the held-back admissions land
        landed = proxy.delivered[b"EVALSHA"] - before
        entries, live = direct.zcard(rates[0].key), direct.zcard(slots[0].key)
        fresh = await store.admit(rates, slots, "after")
        store.release(slots, "after")
        await store.flush()
    finally:
        await store.aclose()
    print(f"\n[{transport}] late admissions: {len(outcomes)} told error, {landed} EVALSHAs reached Redis "
          f"(admissions and undos); rate entries {entries}, slots held {live}")
    assert all(isinstance(outcome, StoreError) for outcome in outcomes)
    assert landed >= 2 * SLOTS  # every undo and every late admission ran
    assert entries == 0 and live == 0
    assert fresh.admitted and fresh.slot_counts == [0]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_first_request_whose_reply_was_lost_is_admitted_once(
    server: PrivateRedis, proxy: FaultProxy, transport: str
) -> None:
    """The issue's case: 1/min and 1 slot, the first request's reply lost after Redis admitted
    it. The store sends it once more; admit.lua finds the lease's own entry and answers
    "admitted" (before: "refused, retry in 59998 ms" while Redis held its entry and its slot)."""
    store = RedisStore(store_url(proxy.port, transport), prefix="t", timeout=TIMEOUT, lease=LEASE)
    await store.start()
    rates, slots = [RateBucket("t:{one}:r:rpm", 1, 60_000)], [SlotBucket("t:{one}:s:req", 1)]
    direct = server.client()
    try:
        await store.check_ready()
        before = proxy.delivered[b"EVALSHA"]
        proxy.set_mode("cut_replies", cuts=1)
        result = await store.admit(rates, slots, "first")
        sent = proxy.delivered[b"EVALSHA"] - before
        entries, held = direct.zrange(rates[0].key, 0, -1), direct.zrange(slots[0].key, 0, -1)
        second = await store.admit(rates, slots, "second")
        store.release(slots, "first")
        await store.flush()
    finally:
        await store.aclose()
    assert proxy.cuts_done == 1 and sent == 2  # it ran, its reply was lost, it was sent once more
    assert result.admitted and result.rate_counts == [0] and result.slot_counts == [0]
    assert entries == [b"first"] and held == [b"first"]
    assert not second.admitted and second.reason == "rate"
