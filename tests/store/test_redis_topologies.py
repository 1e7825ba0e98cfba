"""RedisStore over Sentinel and Cluster URLs, on private redis-server processes: the same
scripts, one hash tag per call, SCRIPT LOAD on every primary, NOSCRIPT recovery through a
cluster pipeline. Processes are stopped by their own PID only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis

from gateway.store.redis import RedisStore
from tests.store.conftest import RecordingObserver, rate, slot
from tests.support.redis_server import PrivateRedis, free_port, private_redis
from tests.support.topologies import redis_cluster

pytestmark = [pytest.mark.redis, pytest.mark.anyio]


@contextlib.contextmanager
def sentinel_for(master: PrivateRedis, service: str) -> Iterator[int]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found")
    workdir = tempfile.mkdtemp(prefix="gw-sentinel-")
    port = free_port()
    config = os.path.join(workdir, "sentinel.conf")
    with open(config, "w") as file:
        file.write(
            f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
        )
    process = subprocess.Popen(
        ["redis-server", config, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, socket_timeout=1).ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("redis sentinel did not start")
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_cluster_admits_across_slots_and_survives_script_flush() -> None:
    with redis_cluster() as nodes:
        observer = RecordingObserver()
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes[:2])
        store = RedisStore(url, prefix="t", timeout=0.5, lease=10.0, observer=observer)
        await store.start()
        try:
            tags = [f"k{n}" for n in range(12)]  # spread over the three primaries
            results = await asyncio.gather(
                *(
                    store.admit([rate("rpm", 3, 60_000, tag)], [slot("requests", 2, tag)], f"{tag}-{n}")
                    for tag in tags
                    for n in range(4)
                )
            )
            assert sum(result.admitted for result in results) == 2 * len(tags)
            for node in nodes:  # what a failover to a fresh primary looks like
                node.client().script_flush()
            more = await asyncio.gather(
                *(store.admit([rate("rpm", 3, 60_000, tag)], [], f"{tag}-x") for tag in tags)
            )
            assert all(result.admitted and result.rate_counts == [2] for result in more)
            for node in nodes:
                node.client().script_flush()
            assert await store.renew() == 0
            await store.check_ready()
            for tag in tags:
                for n in range(4):
                    store.release([slot("requests", 2, tag)], f"{tag}-{n}")
            await store.flush()
            assert observer.errors == {}
        finally:
            await store.aclose()
        for node in nodes:
            client = node.client()
            for key in client.scan_iter():
                assert client.pttl(key) > 0
                assert b":s:" not in key  # every slot set emptied (and so deleted)


async def test_sentinel_url_finds_the_master() -> None:
    requests = slot("requests", 2)
    with private_redis() as master, sentinel_for(master, "gwmaster") as sentinel_port:
        db3 = redis.Redis(port=master.port, db=3)  # the db named in the URL
        store = RedisStore(
            f"redis+sentinel://127.0.0.1:{sentinel_port}/gwmaster/3", prefix="t", timeout=0.5, lease=10.0
        )
        await store.start()
        try:
            results = await asyncio.gather(*(store.admit([], [requests], f"l{n}") for n in range(5)))
            assert sum(result.admitted for result in results) == 2
            assert db3.zcard(requests.key) == 2
            await store.check_ready()
            for n in range(5):
                store.release([requests], f"l{n}")
            await store.flush()
            assert db3.zcard(requests.key) == 0
        finally:
            await store.aclose()
            db3.close()
