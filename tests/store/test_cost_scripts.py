"""admit.lua, undo.lua and settle.lua called directly, with costs, quotas, counters and a
weighted lease: a replay (the same lease id run again) answers as the first run did and writes
nothing; undo.lua takes back every unit and member, once; an admission landing after its undo
takes nothing; settle.lua applies once however often it runs. On fakeredis and a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest
import redis

from gateway.store import scripts
from gateway.store.base import (
    AdmitResult,
    QuotaBucket,
    RateBucket,
    Settlement,
    SlotBucket,
    StoreError,
    weighted_lease,
)

NOW = 1_767_225_600_000  # 2026-01-01T00:00Z
RATES = [RateBucket("t:{x}:r:credits", 100, 60_000, counts_cost=True),
         RateBucket("t:{x}:a:credits", 100, 60_000, exact=False, counts_cost=True),
         RateBucket("t:{x}:r:requests", 100, 60_000)]
QUOTAS = [QuotaBucket("t:{x}:q:monthly", 50, "month")]
SLOTS = [SlotBucket("t:{x}:s:browsers", 3)]


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        direct = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield direct
        direct.close()


def admit(client: redis.Redis, lease_id: str, cost: int, now: int = NOW) -> AdmitResult:
    keys, args = scripts.admit_call(RATES, SLOTS, lease_id, "30000", str(now), None, QUOTAS, cost)
    reply = client.eval(scripts.load("admit").source.decode(), len(keys), *keys, *args)
    return scripts.decode_admit(reply, lease_id, len(RATES), len(SLOTS), False, len(QUOTAS), keys)


def undo(client: redis.Redis, lease_id: str, cost: int) -> int:
    keys, args = scripts.undo_call(RATES, SLOTS, lease_id, "30000", str(NOW + 5), "60000", QUOTAS, cost)
    return int(client.eval(scripts.load("undo").source.decode(), len(keys), *keys, *args))


def settle(client: redis.Redis, lease_id: str, settlement: Settlement) -> int:
    keys, args = scripts.settle_call(SLOTS, lease_id, settlement, str(NOW + 10), "60000")
    return int(client.eval(scripts.load("settle").source.decode(), len(keys), *keys, *args))


def state(client: redis.Redis) -> tuple[int, int, int, int, int]:
    """(log units, counter count, request entries, quota used, slot members)."""
    return (client.zcard(RATES[0].key), int(client.hget(RATES[1].key, "c") or 0), client.zcard(RATES[2].key),
            int(client.hget(QUOTAS[0].key, "u") or 0), client.zcard(SLOTS[0].key))


def test_a_replay_answers_as_the_first_run_and_writes_nothing(client: redis.Redis) -> None:
    assert admit(client, "before", 2).admitted
    lease = weighted_lease("req", 2)
    first = admit(client, lease, 5)
    again = admit(client, lease, 5, NOW + 3)
    assert first.admitted and again.admitted
    for field in ("rate_counts", "slot_counts", "quota_counts"):
        assert getattr(again, field) == getattr(first, field) == {"rate_counts": [2, 2, 1], "slot_counts": [1],
                                                                  "quota_counts": [2]}[field]
    assert state(client) == (7, 7, 2, 7, 3)


def test_undo_takes_back_every_unit_and_member_once(client: redis.Redis) -> None:
    assert admit(client, "before", 2).admitted
    lease = weighted_lease("req", 2)
    assert admit(client, lease, 5).admitted
    assert undo(client, lease, 5) == 1
    assert undo(client, lease, 5) == 0  # idempotent
    assert state(client) == (2, 2, 1, 2, 1)
    with pytest.raises(StoreError, match="after it was undone"):
        admit(client, lease, 5)  # its EVALSHA landing late takes nothing
    assert state(client) == (2, 2, 1, 2, 1)


def test_settle_applies_once(client: redis.Redis) -> None:
    lease = weighted_lease("req", 2)
    admitted = admit(client, lease, 5)
    refund = Settlement(tuple(RATES[:2]), tuple(QUOTAS), 5, 1, admitted.now_ms)
    assert settle(client, lease, refund) == 1
    assert settle(client, lease, refund) == 0
    assert state(client) == (1, 1, 1, 1, 0)
    assert admitted.now_ms == NOW


def test_counters_and_quotas_alone_are_traced_for_replays_and_undo(client: redis.Redis) -> None:
    """No log, no slot: nothing of the lease id would be found; the trace set finds it."""
    rates, quotas = RATES[1:2], QUOTAS

    def run_admit(lease_id: str, now: int = NOW) -> AdmitResult:
        keys, args = scripts.admit_call(rates, (), lease_id, "30000", str(now), None, quotas, 4)
        reply = client.eval(scripts.load("admit").source.decode(), len(keys), *keys, *args)
        return scripts.decode_admit(reply, lease_id, 1, 0, False, 1, keys)

    def counts() -> tuple[int, int]:
        return int(client.hget(RATES[1].key, "c") or 0), int(client.hget(QUOTAS[0].key, "u") or 0)

    first = run_admit("one")
    again = run_admit("one", NOW + 2)
    assert first.admitted and again.admitted
    assert (again.rate_counts, again.quota_counts) == (first.rate_counts, first.quota_counts) == ([0], [0])
    assert counts() == (4, 4)
    assert run_admit("two").admitted
    keys, args = scripts.undo_call(rates, (), "two", "30000", str(NOW + 5), "60000", quotas, 4)
    undo_source = scripts.load("undo").source.decode()
    assert client.eval(undo_source, len(keys), *keys, *args) == 1
    assert client.eval(undo_source, len(keys), *keys, *args) == 0
    assert counts() == (4, 4)
    assert client.pttl(scripts.trace_key(RATES[1].key)) > 0
