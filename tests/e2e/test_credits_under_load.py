"""Credits under concurrent load over two gateway processes on one Redis (issue 18): a
ZenRows-style plan (1/5/10/25 units by query, 100 units per 2 s, 300 units per UTC day, four
browser slots of which a JS render holds two). The mock upstream prices what it receives by the
same rules and never sees more units per window or per day, or more weighted slots at once,
than configured; Redis and the admin view hold exactly the units the upstream received."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.credits import (
    Traffic,
    admin_bucket,
    credit_config,
    drive,
    key_entry,
    max_units_in_window,
    seconds_to_utc_midnight,
    set_pricing,
)
from tests.support.invariants import assert_no_leaks
from tests.support.processes import gateway, mock_upstream, write_config
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

PREFIX = "gwcredits"
RATE, WINDOW, QUOTA, SLOTS = 100, 2.0, 300, 4
LEDGER = 100_000  # an hour-long cost log that never binds: its ZCARD is every unit admitted
JITTER = 0.1  # upstream arrivals lag the admission decision by a little scheduling noise
PRICIEST = 25  # the dearest request of the price list


def _plans() -> dict[str, object]:
    return {
        "scraper": {"limits": {
            "credits": {"rate": f"{RATE}/2s", "counts": "cost"},
            "daily": {"quota": f"{QUOTA}/1d"},
            "browsers": {"concurrency": SLOTS},
        }},
        "crawler": {"limits": {
            "ledger": {"rate": f"{LEDGER}/1h", "counts": "cost"},
            "browsers": {"concurrency": SLOTS},
        }},
    }


def _ietf_remaining(headers: dict[str, str], policy: str) -> int:
    """`r` of the IETF `RateLimit` item named `policy`."""
    for item in headers["ratelimit"].split(","):
        name, *params = item.strip().split(";")
        if name == f'"{policy}"':
            return int(dict(param.split("=", 1) for param in params)["r"])
    raise AssertionError(f"no {policy!r} item in RateLimit: {headers['ratelimit']!r}")


def _store_keys(client: redis.Redis, suffix: str) -> list[bytes]:
    return [name for name in client.scan_iter(match=f"{PREFIX}:*{suffix}", count=1000)]


def test_units_slots_and_quota_hold_across_two_gateways(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    if seconds_to_utc_midnight() < 60:
        pytest.skip("the UTC day ends during the run")
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", credit_config(
            upstream, redis_url, prefix=PREFIX, keys=[key_entry("hot", "scraper"), key_entry("busy", "crawler")],
            plans=_plans(), limits=["credits", "daily", "browsers", "ledger"],
        ))
        with gateway(config) as a, gateway(config) as b:
            urls = [a.url, b.url]

            async def scenario() -> tuple[Traffic, Traffic]:
                return await asyncio.gather(
                    drive(urls, secret("hot"), clients=16, duration=7.0, seed=1, path="/hold", extra="ms=40"),
                    drive(urls, secret("busy"), clients=16, duration=4.0, seed=2, path="/hold", extra="ms=60"),
                )

            hot, busy = asyncio.run(scenario())
            stats = httpx.get(upstream + "/_stats").json()["keys"]
            views = {gw.admin_url: (admin_bucket(gw.admin_url, "hot", "daily"),
                                    admin_bucket(gw.admin_url, "busy", "ledger")) for gw in (a, b)}
            ledger_keys = _store_keys(redis_sync, ":r:ledger")
            ledger_units = sum(int(redis_sync.zcard(name)) for name in ledger_keys)
        assert_no_leaks(redis_sync, PREFIX)  # every weighted slot was given back

    # -- the plan that binds on units: rate, then the day's quota
    statuses = Counter(answer.status for answer in hot.answers)
    assert set(statuses) == {200, 402, 429}, statuses
    seen = stats["hot"]
    admitted = hot.by_status(200)
    assert seen["total"] == len(admitted) == seen["completed"]
    assert seen["units"] == hot.units(200) == seen["settled_units"]  # the same price on both sides
    assert [int(answer.headers["x-request-cost"]) for answer in admitted] == [answer.cost for answer in admitted]
    # any window of the upstream's arrivals holds at most RATE units (less the arrival jitter)
    assert max_units_in_window(seen["arrivals"], seen["costs"], WINDOW - JITTER) <= RATE
    # the day's quota: never more than QUOTA units, and it was really spent (a 1-unit request
    # always fits what is left, and the mix keeps sending them)
    assert QUOTA - PRICIEST < seen["units"] <= QUOTA
    assert sum(seen["units_by_day"].values()) == seen["units"] and max(seen["units_by_day"].values()) <= QUOTA
    assert seen["max_slots_in_flight"] <= SLOTS
    for answer in hot.answers:
        assert answer.status == 200 or answer.body is not None
        if answer.status == 402:
            assert answer.body is not None and answer.body["error"] == "quota_exceeded", answer.body
            to_midnight = seconds_to_utc_midnight(answer.received_wall)
            # the period's end in whole seconds, rounded up (less a few ms: a cached refusal counts
            # down from the clock read before its store call)
            assert -0.1 <= int(answer.headers["retry-after"]) - to_midnight <= 1.1, (answer.headers, to_midnight)
        elif answer.status == 429:
            assert answer.body is not None and answer.body["error"] in ("rate_limited", "concurrency_limited")
    # every 402 came when fewer units were left than it cost, as its own RateLimit item says (the
    # store's order, which no client-side clock can reconstruct), and that count of units used
    # was real: never more than what the upstream received in the end
    for answer in hot.by_status(402):
        left = _ietf_remaining(answer.headers, "daily")
        assert 0 <= left < answer.cost and QUOTA - left <= seen["units"], (answer.cost, answer.headers)
    # Redis holds what was admitted, as both gateways' admin views say
    for daily, _ in views.values():
        assert (daily["used"], daily["limit"]) == (seen["units"], QUOTA), daily

    # -- the plan that binds on weighted slots
    statuses = Counter(answer.status for answer in busy.answers)
    assert set(statuses) == {200, 429}, statuses
    assert {answer.body["error"] for answer in busy.by_status(429) if answer.body} == {"concurrency_limited"}
    seen = stats["busy"]
    assert seen["total"] == statuses[200] and seen["units"] == busy.units(200)
    assert seen["max_slots_in_flight"] == SLOTS  # filled, never exceeded (a JS render weighs 2)
    assert len(ledger_keys) == 1 and ledger_units == seen["units"]
    for _, ledger in views.values():
        assert ledger["used"] == seen["units"], ledger


def test_weighted_waiters_never_overfill_the_slots(tmp_path: Path, redis_url: str, redis_sync: redis.Redis) -> None:
    """Requests of 1 and 2 slots queue for four slots (`wait`) over two processes: the upstream
    never holds more than four weighted slots, every waiter is served, nothing is left held."""
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", credit_config(
            upstream, redis_url, prefix=PREFIX, keys=[key_entry("patient", "queued")],
            plans={"queued": {"limits": {"browsers": {"concurrency": SLOTS, "wait": "5s"}}}}, limits=["browsers"],
        ))
        with gateway(config) as a, gateway(config) as b:
            traffic = asyncio.run(drive([a.url, b.url], secret("patient"), clients=12, duration=3.0, seed=3,
                                        path="/hold", extra="ms=50", weights=(1, 2, 1, 2)))
            seen = httpx.get(upstream + "/_stats").json()["keys"]["patient"]
        assert_no_leaks(redis_sync, PREFIX)
    assert Counter(answer.status for answer in traffic.answers) == {200: len(traffic.answers)}
    assert seen["total"] == len(traffic.answers) and seen["units"] == traffic.units(200)
    assert seen["max_slots_in_flight"] == SLOTS  # filled, never exceeded
    assert 2 in seen["slots"]  # the weighted ones did queue too


def test_settlements_under_load_leave_exactly_what_clients_were_charged(
    tmp_path: Path, redis_url: str, redis_sync: redis.Redis
) -> None:
    """Refunds, extra debits, free 500s and undeclared prices, concurrently over two processes:
    the sum of every answer's X-Request-Cost is what the upstream expected to be billed, what
    the day's quota holds and what the hour's log holds, once every release has landed."""
    with mock_upstream() as upstream:
        set_pricing(upstream)
        config = write_config(tmp_path / "gw.yaml", credit_config(
            upstream, redis_url, prefix=PREFIX, keys=[key_entry("billed", "billed")],
            plans={"billed": {"limits": {"ledger": {"rate": f"{LEDGER}/1h", "counts": "cost"},
                                         "daily": {"quota": "1000000/1d"}, "browsers": {"concurrency": 6}}}},
            limits=["ledger", "daily", "browsers"],
        ))
        with gateway(config) as a, gateway(config) as b:
            traffic = asyncio.run(drive(
                [a.url, b.url], secret("billed"), clients=12, duration=3.0, seed=4, path="/hold", extra="ms=20",
                variants=("", "declare=0", "declare=2", "declare=7", "declare=40", "fail=500", "declare=x"),
            ))
            seen = httpx.get(upstream + "/_stats").json()["keys"]["billed"]
            told = sum(int(answer.headers["x-request-cost"]) for answer in traffic.answers
                       if answer.status in (200, 500))
            deadline = time.monotonic() + 3
            while True:  # releases (and their settlements) are sent just after each answer
                views = [(admin_bucket(gw.admin_url, "billed", "ledger")["used"],
                          admin_bucket(gw.admin_url, "billed", "daily")["used"]) for gw in (a, b)]
                if views == [(told, told)] * 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            (log,) = _store_keys(redis_sync, ":r:ledger")
            logged = int(redis_sync.zcard(log))
        assert_no_leaks(redis_sync, PREFIX)
    statuses = Counter(answer.status for answer in traffic.answers)
    assert set(statuses) <= {200, 429, 500} and statuses[200] > 50 and statuses[500] > 5, statuses
    assert seen["total"] == statuses[200] + statuses[500]
    assert told == seen["settled_units"] != seen["units"]  # settlements did change the bill
    assert views == [(told, told)] * 2
    assert logged == told
