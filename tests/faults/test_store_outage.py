"""A real gateway process while its Redis fails in every way the tests can make it fail:
killed and restarted, frozen (SIGSTOP), paused (CLIENT PAUSE), slowed past the budget,
blackholed, reset, replies dropped after the command ran.

What must hold: no request waits much past `store.timeout`; nothing crashes or answers 5xx
(under `on_error: local`); every degraded decision is counted; readiness says so; and once
Redis answers again, admission goes back through Redis and no slot is left behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.admission.buckets import short_hash
from tests.faults.conftest import (
    BIG_KEY,
    COOLDOWN,
    LEASE,
    PREFIX,
    SLACK,
    SMALL_KEY,
    STORE_TIMEOUT,
    FaultyRedis,
    fault_config,
    gateway_for,
    get,
    readyz,
    timed_get,
    upstream_stats,
)
from tests.support.load import Load, metric, run_load
from tests.support.processes import Proc

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

FALLBACKS = "gateway_store_fallback_decisions_total"
FAULT_SECONDS = 1.2


def wait_until_store_decides(gw: Proc, key: str, within: float) -> float:
    """Send requests until one is decided by the store again (no fallback counted for it);
    return how long that took."""
    started = time.monotonic()
    while True:
        before = metric(gw.admin_url, FALLBACKS)
        get(gw, key)
        if metric(gw.admin_url, FALLBACKS) == before:
            return time.monotonic() - started
        assert time.monotonic() - started < within, "admission never went back to the store"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
def test_on_error_mode_while_redis_is_blackholed(
    mode: str, tmp_path: Path, fresh_upstream: str, faulty_redis: FaultyRedis
) -> None:
    upstream, proxy = fresh_upstream, faulty_redis.proxy
    with gateway_for(tmp_path, fault_config(upstream, faulty_redis.url, on_error=mode)) as gw:
        assert get(gw, SMALL_KEY).status_code == 200  # through Redis: 1 of 5 in its window
        assert readyz(gw) == (200, {"status": "ready", "store": "ok", "breaker": "closed", "on_error": mode})
        upstream_before = upstream_stats(upstream, "small")["total"]

        proxy.set_mode("blackhole")
        # The first requests each pay the store timeout, no more; then the breaker opens.
        first = [timed_get(gw, SMALL_KEY) for _ in range(3)]
        for _, elapsed in first:
            assert STORE_TIMEOUT * 0.8 <= elapsed < STORE_TIMEOUT + SLACK
        sent = proxy.count(b"EVALSHA")
        opened = time.monotonic()

        # While the breaker is open nothing is sent to the store and nobody waits for it.
        if mode == "local":  # this replica's own limits: 2 slots, 6 per 10 s (3 used above)
            holds = asyncio.run(_concurrent_holds(gw, 4))
            assert sorted(status for status, _, _ in holds) == [200, 200, 429, 429]
            assert {error for _, error, _ in holds} == {None, "concurrency_limited"}
            assert all(headers.get("concurrency-limit") == "2" for _, _, headers in holds)
            assert get(gw, SMALL_KEY).status_code == 200  # the 6th
            refused, elapsed = timed_get(gw, SMALL_KEY)
            assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
            assert 1 <= int(refused.headers["retry-after"]) <= 10
        elif mode == "allow":  # no limits at all, and no limit headers: nothing is known
            holds = asyncio.run(_concurrent_holds(gw, 4))
            assert [status for status, _, _ in holds] == [200] * 4
            assert not any("concurrency-limit" in headers for _, _, headers in holds)
            assert get(gw, SMALL_KEY).status_code == 200
            refused, elapsed = timed_get(gw, SMALL_KEY)
            assert refused.status_code == 200
        else:  # deny: 503 store_unavailable with a Retry-After, the upstream untouched
            holds = asyncio.run(_concurrent_holds(gw, 4))
            assert [status for status, _, _ in holds] == [503] * 4
            assert get(gw, SMALL_KEY).status_code == 503
            refused, elapsed = timed_get(gw, SMALL_KEY)
            body = refused.json()
            assert refused.status_code == 503 and body["error"] == "store_unavailable"
            assert int(refused.headers["retry-after"]) == body["retryAfterSeconds"] in (1, 2)
            assert upstream_stats(upstream, "small")["total"] == upstream_before
        open_for = time.monotonic() - opened
        # At most one probe per cooldown reached the store; none at all within the first one.
        assert proxy.count(b"EVALSHA") - sent <= int(open_for / COOLDOWN)
        if open_for < COOLDOWN:  # (on a very slow run the probe may be due)
            assert elapsed < STORE_TIMEOUT  # decided without the store

        # Every degraded decision is counted, exactly once per request.
        assert metric(gw.admin_url, FALLBACKS, mode=mode) == 3 + 4 + 2
        status, body = readyz(gw)
        assert body["status"] == ("store_unavailable" if mode == "deny" else "degraded")
        assert status == (503 if mode == "deny" else 200)
        assert body["store"] == "unavailable" and body["breaker"] == "open"
        assert readyz(gw, strict=True)[0] == 503

        proxy.set_mode("pass")
        recovered = wait_until_store_decides(gw, BIG_KEY, within=COOLDOWN + 2 * STORE_TIMEOUT + 2 * SLACK)
        assert readyz(gw)[1]["status"] == "ready", readyz(gw)
        # The small key is limited by Redis again, whose window saw 1 request before the outage.
        assert get(gw, SMALL_KEY).status_code == 200
        with faulty_redis.client() as direct:
            # (the big key's window holds however many requests the recovery wait sent)
            small_window = f"{PREFIX}:{{k:{short_hash('small')}}}:r:rpm"
            assert direct.zcard(small_window) == 2
    print(f"\n[{mode}] store decides again {recovered:.2f}s after Redis is reachable")
    faulty_redis.assert_no_leaks(within=LEASE + 1)


async def _concurrent_holds(gw: Proc, n: int) -> list[tuple[int, str | None, dict[str, str]]]:
    async with httpx.AsyncClient(timeout=10) as client:
        responses = await asyncio.gather(*(
            client.get(gw.url + "/hold?ms=300", headers={"X-API-Key": SMALL_KEY}) for _ in range(n)
        ))
    return [
        (r.status_code, r.json().get("error") if r.status_code != 200 else None, dict(r.headers))
        for r in responses
    ]


Fault = tuple[Callable[[FaultyRedis], None], Callable[[FaultyRedis], None]]


def _pause(faulty: FaultyRedis) -> None:
    # For as long as the fault lasts: CLIENT UNPAUSE would itself wait for the pause to end.
    with faulty.client() as direct:
        direct.execute_command("CLIENT", "PAUSE", int(FAULT_SECONDS * 1000), "ALL")


def _pause_ends_by_itself(faulty: FaultyRedis) -> None:
    pass


FAULTS: dict[str, Fault] = {
    "kill_and_restart": (FaultyRedis.kill, FaultyRedis.restart),
    "sigstop": (FaultyRedis.freeze, FaultyRedis.thaw),
    "client_pause": (_pause, _pause_ends_by_itself),
    "latency_over_budget": (
        lambda f: f.proxy.set_mode("latency", latency=0.4), lambda f: f.proxy.set_mode("pass")
    ),
    "reset": (lambda f: f.proxy.set_mode("reset"), lambda f: f.proxy.set_mode("pass")),
    "drop_replies": (lambda f: f.proxy.set_mode("drop_replies"), lambda f: f.proxy.set_mode("pass")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_redis_fault_under_load(
    fault: str, tmp_path: Path, fresh_upstream: str, faulty_redis: FaultyRedis
) -> None:
    """8 clients in a closed loop for 2.5 s; Redis fails from 0.6 s for 1.2 s (`on_error: local`)."""
    inject, heal = FAULTS[fault]
    with gateway_for(tmp_path, fault_config(fresh_upstream, faulty_redis.url, on_error="local")) as gw:
        get(gw, BIG_KEY)  # warm: scripts loaded, pool open
        load, t_fault, t_heal = asyncio.run(_load_with_fault(gw, faulty_redis, inject, heal))
        # Recovery: once the leases lost in the outage have expired, everything goes through Redis.
        time.sleep(max(0.0, t_heal + LEASE + 0.2 - time.monotonic()))
        calls = faulty_redis.evalsha_calls()
        wait_until_store_decides(gw, BIG_KEY, within=COOLDOWN + 2 * STORE_TIMEOUT + 2 * SLACK)
        for _ in range(5):
            assert get(gw, BIG_KEY).status_code == 200
        assert faulty_redis.evalsha_calls() >= calls + 5
        fallbacks = metric(gw.admin_url, FALLBACKS, mode="local")
        store_errors = metric(gw.admin_url, "gateway_store_errors_total", operation="admit")
        admissions = metric(gw.admin_url, "gateway_admission_duration_seconds_count")
        within_250ms = metric(gw.admin_url, "gateway_admission_duration_seconds_bucket", le="0.25")
        within_1s = metric(gw.admin_url, "gateway_admission_duration_seconds_bucket", le="1.0")
        assert readyz(gw)[1]["status"] == "ready", readyz(gw)

    during = load.between(t_fault, t_heal)
    before = load.between(0, t_fault)
    # Nothing user-visible: every answer a 200 (local limits are the plan's, far from reached).
    assert load.statuses() == {200: len(load.samples)}, load.statuses()
    assert len(during) > 20  # the load really ran through the outage
    # Nobody waited for Redis much past the budget: the client's view (with scheduling slack) ...
    assert load.max_latency() < STORE_TIMEOUT + SLACK
    # ... and the gateway's own: admissions decided within 150 ms + scheduling slack. On a
    # loaded 2-core machine a few decisions see event-loop lag on top of the budget; none may
    # reach a second (a wait for Redis itself would be the pause, seconds long).
    assert within_250ms >= 0.99 * admissions, (within_250ms, admissions)
    assert within_1s == admissions
    assert fallbacks > 0 and store_errors > 0
    print(f"\n[{fault}] p50 before {load.percentile(0.5, before) * 1000:.1f} ms, during: "
          f"p50 {load.percentile(0.5, during) * 1000:.1f} ms, "
          f"p99 {load.percentile(0.99, during) * 1000:.1f} ms, "
          f"max {load.max_latency(during) * 1000:.1f} ms; {len(during)} requests in the outage, "
          f"{fallbacks:.0f} fallback decisions, {store_errors:.0f} admit errors")
    faulty_redis.assert_no_leaks(within=LEASE + 1)


async def _load_with_fault(
    gw: Proc, faulty: FaultyRedis, inject: Callable[[FaultyRedis], None], heal: Callable[[FaultyRedis], None]
) -> tuple[Load, float, float]:
    load = Load()
    running = asyncio.ensure_future(run_load([gw.url], BIG_KEY, clients=8, duration=2.5, load=load))
    await asyncio.sleep(0.6)
    t_fault = time.monotonic()
    await asyncio.to_thread(inject, faulty)
    await asyncio.sleep(FAULT_SECONDS - (time.monotonic() - t_fault))
    await asyncio.to_thread(heal, faulty)
    t_heal = time.monotonic()
    await running
    return load, t_fault, t_heal
