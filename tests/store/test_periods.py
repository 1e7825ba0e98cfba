"""Quota periods: gateway/store/periods.py against `datetime`, and lua/periods.lua (as the
scripts include it) against periods.py, over many instants: every day boundary of several
years (leap years, month ends, ISO week starts), the ms on either side of each, and random
instants from 1900 to 2400. Also the lease members both sides compute."""

from __future__ import annotations

import datetime
import json
import random

import fakeredis
import pytest
import redis

from gateway.store import periods
from gateway.store.base import lease_members, weighted_lease
from gateway.store.scripts import assemble

DAY = periods.DAY_MS
UTC = datetime.UTC


def by_datetime(now_ms: int, period: str) -> tuple[int, int]:
    """(start_ms, end_ms) of the period holding now_ms, by the calendar."""
    at = datetime.datetime(1970, 1, 1, tzinfo=UTC) + datetime.timedelta(milliseconds=now_ms)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "1d":
        start, end = day, day + datetime.timedelta(days=1)
    elif period == "7d":
        start = day - datetime.timedelta(days=day.weekday())  # ISO: Monday
        end = start + datetime.timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=UTC)
    return (start - epoch) // datetime.timedelta(milliseconds=1), (end - epoch) // datetime.timedelta(milliseconds=1)


def instants() -> list[int]:
    rng = random.Random(18)
    out: list[int] = []
    first = (datetime.date(1999, 12, 1) - datetime.date(1970, 1, 1)).days
    last = (datetime.date(2029, 3, 31) - datetime.date(1970, 1, 1)).days
    for day in range(first, last, 1):
        edge = day * DAY
        out += [edge - 1, edge, edge + 1] if day % 3 == 0 or day % 7 == 4 else [edge]
    out += [rng.randrange(-2_208_988_800_000, 13_569_465_600_000) for _ in range(3000)]
    out += [0, -1, 1, 4 * DAY, 4 * DAY - 1]  # the epoch (a Thursday) and the first Monday
    return out


@pytest.mark.parametrize("period", periods.PERIODS)
def test_python_periods_match_the_calendar(period: str) -> None:
    previous: tuple[int, int] | None = None
    for now in instants():
        index, end, length = periods.period_of(now, period)
        start, expected_end = by_datetime(now, period)
        assert (end, length) == (expected_end, expected_end - start), (now, period)
        assert start <= now < end
        # One index per period: the same start gives the same index, the next start the next.
        if previous is not None and previous[1] == start:
            assert index == previous[0] + 1
        previous = (index, end)
    # Leap years: February 2024 has 29 days, 2100 (not a leap year) 28, 2000 29.
    for year, days in ((2024, 29), (2023, 28), (2100, 28), (2000, 29)):
        feb = (datetime.date(year, 2, 10) - datetime.date(1970, 1, 1)).days * DAY
        if period == "month":
            assert periods.period_of(feb, "month")[2] == days * DAY


def test_fractional_instants_fall_in_the_period_of_their_ms() -> None:
    edge = (datetime.date(2026, 3, 1) - datetime.date(1970, 1, 1)).days * DAY
    assert periods.period_of(edge - 0.001, "month")[1] == edge
    assert periods.period_of(edge + 0.001, "month")[1] > edge


_PROBE = b"""
--#include periods
local out = {}
for i, t in ipairs(cjson.decode(ARGV[1])) do
  local index, end_ms, length = period_of(t, ARGV[2])
  out[i] = {index, end_ms, length}
end
local leases = {}
for i, id in ipairs(cjson.decode(ARGV[3])) do leases[i] = lease_members(id) end
return cjson.encode({out, leases})
"""


def run_probe(client: redis.Redis, times: list[int], period: str, leases: list[str]) -> list:
    # cjson encodes large doubles as %.14g: send and read ms in whole days, then check below.
    return json.loads(client.eval(assemble(_PROBE).decode(), 0, json.dumps(times), period, json.dumps(leases)))


LEASE_IDS = ["a", "a*1", "a*2", "b*3", "c*64", "c*65", "d*", "e*x", "f*2*3", "*4", "g*02", "h*0"]


def check_lua(client: redis.Redis) -> None:
    # Whole-ms instants spread over 1900..2400 and around every month edge of 2023-2025.
    rng = random.Random(7)
    edges = [(datetime.date(y, m, 1) - datetime.date(1970, 1, 1)).days * DAY for y in (2023, 2024, 2025)
             for m in range(1, 13)]
    times = [t + d for t in edges for d in (-1, 0, 1)]
    times += [rng.randrange(-2_208_988_800_000, 13_569_465_600_000) for _ in range(600)]
    for period in periods.PERIODS:
        out, leases = run_probe(client, times, period, LEASE_IDS)
        for now, (index, end, length) in zip(times, out, strict=True):
            assert (int(index), int(end), int(length)) == periods.period_of(now, period), (now, period)
        assert leases == [lease_members(lease) for lease in LEASE_IDS]


def test_lua_periods_match_python_on_fakeredis() -> None:
    check_lua(fakeredis.FakeRedis(server=fakeredis.FakeServer()))


@pytest.mark.redis
def test_lua_periods_match_python_on_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        check_lua(client)
    finally:
        client.close()


def test_weighted_leases_list_their_members() -> None:
    assert lease_members(weighted_lease("x", 1)) == ["x"]
    assert lease_members(weighted_lease("x", 3)) == ["x*3", "x*3#2", "x*3#3"]
    assert len(lease_members("x*500")) == 64  # bounded: MAX_SLOTS
    assert lease_members("x*²") == ["x*²"]  # not an ASCII count: one member, as in Lua
