"""The admission hot path's packed admit.lua call (RedisStore._start_admit with a shape's
`command`) is byte for byte what hiredis packs from admit_call, for any plan shape, lease id,
clock and cost; the shapes are kept per plan's buckets (by identity) and bounded. Pure: no
Redis (the commands are captured, never sent)."""

from __future__ import annotations

import asyncio
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store import redis as redis_store
from gateway.store import scripts
from gateway.store.base import QueueSpot, QuotaBucket, RateBucket, SlotBucket
from gateway.store.pipelined import command_format, fill, pack_command
from gateway.store.redis import RedisStore

# Key text with what could upset a %-format or a RESP length: '%', multibyte characters.
key_text = st.text(alphabet=string.ascii_letters + "%:{}é€💡", max_size=12)
rates = st.lists(st.builds(RateBucket, key_text, st.integers(0, 10**9), st.integers(1, 10**9), st.booleans(),
                           counts_cost=st.booleans(), shadow=st.booleans()), max_size=3)
slots = st.lists(st.builds(SlotBucket, key_text, st.integers(0, 10**6), st.booleans()), max_size=3)
quotas = st.lists(st.builds(QuotaBucket, key_text, st.integers(0, 10**12), st.sampled_from(["1d", "7d", "month"]),
                            st.booleans(), st.booleans()), max_size=2)
lease_ids = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
clocks = st.none() | st.floats(0, 4e9, allow_nan=False)


def tagged(buckets: list, tag: str = "{t}") -> tuple:  # type: ignore[type-arg]
    """The buckets with one hash tag in front of every key (admissions never span tags)."""
    return tuple(type(bucket)(f"{tag}{bucket.key}", *[getattr(bucket, f) for f in bucket.__slots__[1:]])
                 for bucket in buckets)


def captured(clock: float | None) -> tuple[RedisStore, list[bytes]]:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="t", timeout=0.1, lease=5.0,
                       clock=None if clock is None else lambda: clock)
    sent: list[bytes] = []
    store._transport.send_packed = lambda command, on_reply: sent.append(command)  # type: ignore[method-assign]
    return store, sent


@settings(max_examples=300, deadline=None)
@given(rates, slots, quotas, lease_ids, clocks, st.just(1) | st.integers(0, 1000))
def test_the_packed_call_is_what_hiredis_packs_from_admit_call(
    rate_list: list[RateBucket], slot_list: list[SlotBucket], quota_list: list[QuotaBucket],
    lease_id: str, clock: float | None, cost: int,
) -> None:
    rate_tuple, slot_tuple, quota_tuple = tagged(rate_list), tagged(slot_list), tagged(quota_list)
    if not (rate_tuple or slot_tuple or quota_tuple):
        return

    async def admit_twice() -> list[bytes]:
        store, sent = captured(clock)
        for _ in range(2):  # built, then taken from the shapes kept
            store._start_admit(rate_tuple, slot_tuple, lease_id, "admit", None, quota_tuple, cost)
        return sent

    sent = asyncio.run(admit_twice())
    keys, args = scripts.admit_call(rate_tuple, slot_tuple, lease_id, scripts.ms_arg(5.0), scripts.now_arg(clock),
                                    None, quota_tuple, cost)
    expected = pack_command(("EVALSHA", scripts.load("admit").sha, len(keys), *keys, *args))
    assert sent == [expected, expected]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=8), max_size=6), st.lists(st.text(min_size=0, max_size=8), min_size=3, max_size=3))
def test_command_format_fills_like_pack_command(fixed: list[str], values: list[str]) -> None:
    holes = ("\x00a\x00", "\x00b\x00", "\x00c\x00")
    args = ("CMD", *fixed[:2], holes[0], *fixed[2:4], holes[1], holes[2], *fixed[4:])
    filled = fill(command_format(args, holes), *(value.encode() for value in values))
    assert filled == pack_command(tuple(values[holes.index(arg)] if arg in holes else arg for arg in args))


def test_a_hole_must_be_there_once_and_in_order() -> None:
    with pytest.raises(ValueError):
        command_format(("CMD", "x"), ("\x00a\x00",))
    with pytest.raises(ValueError):
        command_format(("CMD", "\x00a\x00", "\x00a\x00"), ("\x00a\x00",))
    with pytest.raises(ValueError):
        command_format(("CMD", "\x00b\x00", "\x00a\x00"), ("\x00a\x00", "\x00b\x00"))


def test_a_key_holding_a_marker_goes_as_lists_and_queued_calls_too() -> None:
    async def main() -> None:
        store, sent = captured(None)
        listed: list[tuple[list[str], list[str | int]]] = []
        store._transport.send_eval = lambda script, keys, args, on_reply: listed.append((keys, args))  # type: ignore[method-assign]
        # A marker alone in a key is harmless (its bulk string has another length); the whole
        # bulk string of a hole in a key would make it appear twice: refused, sent as lists.
        hole = scripts.ADMIT_HOLES[0]
        odd = (RateBucket(f"{{t}}${len(hole)}\r\n{hole}\r\n", 5, 1000),)
        store._start_admit(odd, (), "lease", "admit", None, (), 1)
        slot = (SlotBucket("{t}s", 2),)
        spot = QueueSpot("lease", 3000)
        store._start_admit((), slot, "lease", "admit", spot, (), 1)
        assert sent == []
        assert listed == [scripts.admit_call(odd, (), "lease", scripts.ms_arg(5.0), "", None, (), 1),
                          scripts.admit_call((), slot, "lease", scripts.ms_arg(5.0), "", spot, (), 1)]

    asyncio.run(main())


def test_shapes_are_kept_per_plan_buckets_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "MAX_SHAPES", 3)

    async def main() -> None:
        store, _ = captured(None)
        plans = [((RateBucket(f"{{t{i}}}r", 5, 1000),), (SlotBucket(f"{{t{i}}}s", 2),)) for i in range(5)]
        for rate, slot in plans:
            store._start_admit(rate, slot, "lease", "admit", None, (), 1)
            store._start_admit(rate, slot, "lease", "admit", None, (), 1)
        assert len(store._shapes) == 3
        kept = [shape.rates for shape in store._shapes.values()]
        assert kept == [plan[0] for plan in plans[2:]]  # the oldest went first
        # Lists are never kept (a caller could change them): built for the one call.
        store._start_admit([RateBucket("{t9}r", 5, 1000)], [], "lease", "admit", None, [], 1)
        assert len(store._shapes) == 3 and all(shape.rates is not plans[0][0] for shape in store._shapes.values())

    asyncio.run(main())


def test_keys_across_hash_tags_are_refused_before_anything_is_kept() -> None:
    async def main() -> None:
        store, sent = captured(None)
        with pytest.raises(ValueError):
            store._start_admit((RateBucket("{a}r", 5, 1000),), (SlotBucket("{b}s", 2),), "lease", "admit", None, (), 1)
        assert sent == [] and store._shapes == {}

    asyncio.run(main())


def test_releases_pack_like_hiredis_and_a_lost_connection_resends_each_zrem_once() -> None:
    from gateway.store.pipelined import Endpoint, PipelinedRedis
    from gateway.store.transport import ConnectionLost

    async def scenario() -> None:
        client = PipelinedRedis(Endpoint("127.0.0.1", 1, None, 0, None, None), timeout=1.0)
        sent: list[tuple[bytes, object]] = []
        client.send = lambda command, on_reply: sent.append((command, on_reply))  # type: ignore[method-assign]
        failures: list[None] = []
        client.on_release_error = lambda: failures.append(None)
        client.release(["{t}a%", "{t}é"], ["lease"], ["ch"])
        client.release(["{t}a%"], ["lease*2", "lease*2#2"], [])
        client.release(["{t}a%"], ["other€"], [])
        expected = [pack_command(("ZREM", "{t}a%", "lease")), pack_command(("ZREM", "{t}é", "lease")),
                    pack_command(("PUBLISH", "ch", "1")), pack_command(("ZREM", "{t}a%", "lease*2", "lease*2#2")),
                    pack_command(("ZREM", "{t}a%", "other€"))]
        assert [command for command, _ in sent] == expected
        first, sent[:] = list(sent), []
        for _, on_reply in first:  # the connection is lost: everything waiting fails, in order
            on_reply(ConnectionLost("lost"))  # type: ignore[operator]
        # Every ZREM once more at once (idempotent), the PUBLISH not; its failure is counted.
        zrems = [expected[0], expected[1], expected[3], expected[4]]
        assert [command for command, _ in sent] == zrems
        assert len(failures) == 1
        second, sent[:] = list(sent), []
        for _, on_reply in second:  # lost again (Redis still down): counted, not sent at once
            on_reply(ConnectionLost("lost"))  # type: ignore[operator]
        assert sent == [] and len(failures) == 5 and not client._zrems
        # After a pause, sent again, all together, until they land.
        await asyncio.sleep(0.05)
        assert [command for command, _ in sent] == zrems
        for _, on_reply in sent:
            on_reply(1)  # type: ignore[operator]
        assert not client._lost and not client._resending and len(failures) == 5
        await client.aclose()

    asyncio.run(scenario())


def test_admit_replies_that_are_not_what_the_call_asked_for_are_refused() -> None:
    from gateway.store.base import StoreError

    good = [b"lease", 0, 0, 2, 1_700_000_000_123_456, 4, 900, 1, 0]  # 1 rate, 1 slot, no shadow
    result = scripts.decode_admit(list(good), "lease", 1, 1)
    assert (result.admitted, result.rate_counts, result.rate_reset_ms, result.slot_counts, result.reclaimed,
            result.now_ms) == (True, [4], [900], [1], 2, 1_700_000_000_123.456)
    assert scripts.admit_layout(1, 1, 0, False).decode(list(good), "lease", (), b"lease") == result
    bad = {
        "undone": [b"lease", 3],
        "short": good[:-1],
        "long": [*good, 7],
        "a string": [*good[:5], b"4", *good[6:]],
        "a nil": [*good[:5], None, *good[6:]],
        "another lease": [b"other", *good[1:]],
        "unknown status": [b"lease", 5, *good[2:]],
        "not a list": b"OK",
    }
    for reply in bad.values():
        with pytest.raises(StoreError):
            scripts.decode_admit(reply, "lease", 1, 1)
        with pytest.raises(StoreError):
            scripts.admit_layout(1, 1, 0, False).decode(reply, "lease", (), b"lease")
    shadow = [b"lease", 0, 0, 0, 5_000, 4, 900, 1, 1, 2]  # position 2: the slot key
    assert scripts.decode_admit(shadow, "lease", 1, 1, keys=["r", "s"]).shadow_refused == ["s"]


def test_a_settle_call_says_what_it_releases() -> None:
    """settle_release reads back settle_call's layout (a settlement given up is released so)."""
    from gateway.store.base import Settlement

    credits = RateBucket("t:{k}:r:credits", 10, 60_000, counts_cost=True)
    slots = [SlotBucket("t:{k}:c:req", 2), SlotBucket("t:{k}:c:other", 1)]
    keys, args = scripts.settle_call(slots, "lease*2", Settlement((credits,), (), 5, 2, 1.0), "", "60000",
                                     ["ch1", "ch2"])
    assert scripts.settle_release(keys, args) == (["t:{k}:c:req", "t:{k}:c:other"], "lease*2", ["ch1", "ch2"])
    keys, args = scripts.settle_call(slots[:1], "lease", None, "", "60000")
    assert scripts.settle_release(keys, args) == (["t:{k}:c:req"], "lease", [])
