"""Scaling: how admission cost and Redis memory per key grow with the limit size and the
number of active keys.

1. Limit size (10 → 10,000 per window), straight against the gateway's own `RedisStore` and
   `admit.lua` (no HTTP): Redis memory per rate bucket (`MEMORY USAGE ... SAMPLES 0`) holding
   N entries, Redis-side µs per EVALSHA when admitting into a bucket of ~N entries and when
   refusing from a full one (`INFO commandstats`), and the client's wall time per sequential
   admission call.
   The same for `exact: false` rate buckets (a sliding-window counter: one small hash whatever
   N), under "counter_limits".
2. Active keys (1 → 100,000), through a real gateway (Redis store, aiohttp, 1 worker) whose
   config holds that many keys (generated): every key's buckets are created first (one
   admission each, through the store with the gateway's own bucket names), then wrk rotates
   over the first K keys (bench/wrk/keys.lua). Reports throughput, gateway CPU-µs per request,
   Redis µs per EVALSHA and Redis memory per active key (`used_memory` delta / K).

Run alone: `.venv/bin/python bench/scaling.py --redis-port P --upstream-port Q [--quick]`
(with a redis-server you may flush and an upstream on Q).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import loads
import redis
from procs import Proc, free_port, pinned, wait_port
from stack import GATEWAY, LOAD_CPUS, PATH, SUT_CPUS

from gateway.admission.buckets import build_plan
from gateway.admission.controller import new_lease_id
from gateway.config.loader import load_config
from gateway.store.base import RateBucket, SlotBucket
from gateway.store.redis import RedisStore

LIMITS = (10, 100, 1000, 10000)
ACTIVE_KEYS = (1, 100, 1000, 10000, 100000)
QUICK_ACTIVE_KEYS = (1, 1000)


def _evalsha(client: redis.Redis) -> tuple[float, float]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return float(stats.get("calls", 0)), float(stats.get("usec", 0))


async def _admit_many(store: RedisStore, rates: tuple[RateBucket, ...], count: int, chunk: int = 2000) -> int:
    admitted = 0
    while count > 0:
        n = min(chunk, count)
        results = await asyncio.gather(*(store.admit(rates, (), new_lease_id()) for _ in range(n)))
        admitted += sum(1 for r in results if r.admitted)
        count -= n
    return admitted


async def _limit_sweep(
    redis_url: str, client: redis.Redis, limits: tuple[int, ...], *, exact: bool = True
) -> list[dict[str, Any]]:
    """Memory and Redis cost per call as the limit grows: the exact log (`exact: true`, one entry
    per admission), or the sliding-window counter (`exact: false`, one small hash whatever N)."""
    store = RedisStore(redis_url, prefix="scale", timeout=5.0, lease=30.0)
    await store.start()
    rows = []
    kind = "r" if exact else "a"
    try:
        for limit in limits:
            client.flushdb()
            # Enough buckets that each figure averages over thousands of calls.
            buckets = max(1, 4000 // limit)
            window_ms = 3_600_000
            all_rates = [(RateBucket(f"scale:{{n{limit}b{b}}}:{kind}:rate", limit, window_ms, exact),)
                         for b in range(buckets)]
            fill_to = limit - max(1, limit // 10)
            for rates in all_rates:
                await _admit_many(store, rates, fill_to)
            calls0, usec0 = _evalsha(client)
            for rates in all_rates:
                await _admit_many(store, rates, limit - fill_to)
            calls1, usec1 = _evalsha(client)
            sizes = [int(client.memory_usage(r[0].key, samples=0) or 0) for r in all_rates]
            # Refusals from full buckets, concurrently (as a crowd of clients would send them) ...
            refusals = 2000
            await asyncio.gather(*(store.admit(all_rates[i % buckets], (), new_lease_id()) for i in range(refusals)))
            calls2, usec2 = _evalsha(client)
            row: dict[str, Any] = {
                "limit": limit,
                "buckets": buckets,
                "bytes_per_bucket": statistics.median(sizes),
                "redis_us_per_admit_near_full": (usec1 - usec0) / max(1, calls1 - calls0),
                "redis_us_per_refusal_full": (usec2 - usec1) / max(1, calls2 - calls1),
            }
            if exact:
                # ... and the wall time of one call at a time, as one request sees it.
                walls = []
                for i in range(300):
                    t0 = time.perf_counter()
                    await store.admit(all_rates[i % buckets], (), new_lease_id())
                    walls.append((time.perf_counter() - t0) * 1e6)
                card = int(client.zcard(all_rates[0][0].key))
                row.update({
                    "entries_per_bucket": card,
                    "bytes_per_entry": statistics.median(sizes) / max(1, card),
                    "client_us_per_call_p50": statistics.median(walls),
                    "client_us_per_call_p90": sorted(walls)[int(len(walls) * 0.9)],
                })
            else:
                row["admitted_per_bucket"] = int(client.hget(all_rates[0][0].key, "c") or 0)
            rows.append(row)
            mode = "" if exact else " (exact: false)"
            print(f"  limit {limit}{mode}: {row['bytes_per_bucket']:.0f} B/bucket", file=sys.stderr)
        client.flushdb()
        if exact:
            slot_key = "scale:{slot}:c:inflight"
            await store.admit((), (SlotBucket(slot_key, 10),), new_lease_id())
            slot_bytes = int(client.memory_usage(slot_key, samples=0) or 0)
            rows.append({"slot_bucket_one_lease_bytes": slot_bytes})
            client.flushdb()
    finally:
        await store.aclose()
    return rows


def _keys_config(path: str, port: int, admin: int, upstream_port: int, redis_url: str, count: int) -> None:
    lines = [
        "# generated by bench/scaling.py: many keys, limits never hit",
        f"listen: 127.0.0.1:{port}",
        f"admin_listen: 127.0.0.1:{admin}",
        "shutdown_grace: 1s",
        f"upstream: {{url: 'http://127.0.0.1:{upstream_port}', client: aiohttp}}",
        f"store: {{url: '{redis_url}', prefix: keys}}",
        "plans:",
        "  bench:",
        "    limits:",
        "      rate: {rate: 100000/1m}",
        "      inflight: {concurrency: 1000}",
        "routes:",
        "  - path: /v1/**",
        "    limits: [rate, inflight]",
        "keys:",
    ]
    lines += [f"  - {{id: k{i}, key: {key_secret(i)}, plan: bench}}" for i in range(count)]
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")


def key_secret(i: int) -> str:
    return f"bench-key-{i:06d}"


async def _prefill(redis_url: str, config_path: str, count: int) -> None:
    """One admission per key, into the very buckets the gateway uses (its bucket names)."""
    config = load_config(config_path)
    route = config.routes[0]
    store = RedisStore(redis_url, prefix="keys", timeout=5.0, lease=30.0)
    await store.start()
    try:
        plans = [build_plan(config, key, route) for key in config.keys[:count]]
        for start in range(0, len(plans), 2000):
            await asyncio.gather(*(store.admit(p.rates, (), new_lease_id()) for p in plans[start:start + 2000]))
    finally:
        await store.aclose()


def _keys_sweep(run_dir: str, redis_port: int, upstream_port: int, client: redis.Redis, active: tuple[int, ...],
                seconds: float, connections: int) -> list[dict[str, Any]]:
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    most = max(active)
    config_path = os.path.join(run_dir, "keys.yaml")
    port = free_port()
    _keys_config(config_path, port, free_port(), upstream_port, redis_url, most)
    keyfiles = {}
    for count in active:
        keyfiles[count] = os.path.join(run_dir, f"keys-{count}.txt")
        with open(keyfiles[count], "w") as file:
            file.write("\n".join(key_secret(i) for i in range(count)) + "\n")
    started = time.monotonic()
    proc = Proc("gw-keys", pinned(SUT_CPUS, [GATEWAY, "serve", "-c", config_path]), os.path.join(run_dir, "gw-keys.log")).start()
    rows: list[dict[str, Any]] = []
    try:
        wait_port(port, proc, timeout=300)
        load_s = time.monotonic() - started
        print(f"  gateway with {most} keys answered after {load_s:.1f} s", file=sys.stderr)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk", "keys.lua")
        for count in active:
            client.flushdb()
            base = int(client.info("memory")["used_memory"])
            asyncio.run(_prefill(redis_url, config_path, count))
            filled = int(client.info("memory")["used_memory"])
            sample_keys = list(client.scan_iter(match="keys:*:r:rate", count=1000))[:50]
            per_bucket = statistics.median(int(client.memory_usage(k, samples=0) or 0) for k in sample_keys) if sample_keys else 0
            # A short warm-up over the same keys, then the measured run.
            loads.run_wrk(f"http://127.0.0.1:{port}{PATH}", seconds=2, connections=connections, headers={},
                          cpus=LOAD_CPUS, script=script, script_args=[keyfiles[count]])
            client.config_resetstat()

            def measure() -> dict[str, dict[int, float]]:
                return {"sut": proc.cpu()}

            result = loads.run_wrk(f"http://127.0.0.1:{port}{PATH}", seconds=seconds, connections=connections, headers={},
                                   cpus=LOAD_CPUS, script=script, script_args=[keyfiles[count]], measure=measure)
            calls, usec = _evalsha(client)
            rows.append({
                "active_keys": count,
                "rps": result.rps,
                "non2xx": result.status.get("non2xx", 0),
                "errors": result.errors,
                "gateway_cpu_us_per_request": result.cpu_s.get("sut", 0) / max(1, result.requests) * 1e6,
                "evalsha_per_request": calls / max(1, result.requests),
                "redis_us_per_evalsha": usec / max(1, calls),
                "redis_bytes_per_active_key": (filled - base) / count,
                "rate_bucket_bytes": per_bucket,
                "latency_us": result.latency_us,
            })
            print(f"  {count} active keys: {result.rps:.0f} rps", file=sys.stderr)
    finally:
        proc.stop()
        client.flushdb()
    return [{"config_keys": most, "gateway_start_s": load_s}, *rows]


def run_all(*, run_dir: str, redis_port: int, upstream_port: int, quick: bool, seconds: float, connections: int) -> dict[str, Any]:
    client = redis.Redis(port=redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    print("[scaling] limit size", file=sys.stderr)
    limits = asyncio.run(_limit_sweep(redis_url, client, (10, 1000) if quick else LIMITS))
    counter_limits = asyncio.run(_limit_sweep(redis_url, client, (10, 1000) if quick else LIMITS, exact=False))
    print("[scaling] active keys", file=sys.stderr)
    keys = _keys_sweep(run_dir, redis_port, upstream_port, client, QUICK_ACTIVE_KEYS if quick else ACTIVE_KEYS,
                       seconds, connections)
    return {"limits": limits, "counter_limits": counter_limits, "keys": keys}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--run-dir", default="/tmp")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out = run_all(run_dir=args.run_dir, redis_port=args.redis_port, upstream_port=args.upstream_port,
                  quick=args.quick, seconds=3 if args.quick else 5, connections=64)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
