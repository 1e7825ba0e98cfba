"""A Redis whose wall clock jumps (libfaketime, driven by a timestamp file moved forward and
back, monotonic time left alone, as an NTP step does; tests/support/libc_malloc_shim.c keeps
Debian's jemalloc out of the way, which libfaketime cannot start under). Time is Redis TIME, so windows and
leases follow Redis's clock, and so do key TTLs. What that does, measured here and written in
docs/failure-modes.md ("Redis's clock jumps"):

- forward by J: every entry and lease older than J looks expired. A rate window that was full
  admits a whole limit again at once (L more); leases look expired, so the next admission
  reclaims them, or finds their key expired by Redis (TTLs follow the same clock): up to N more
  in flight; the heartbeat counts them lost (it never renews a lease back to life); job members whose `max_duration` ends within J are freed.
- backward by J: entries look J younger. A full window refuses for up to J + window
  (Retry-After says so, exactly); leases live up to J longer unless released (a release is a
  ZREM by id and frees at once); nothing is over-admitted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from gateway.store.base import RateBucket, SlotBucket
from gateway.store.redis import RedisStore
from tests.faults.test_crashes import FAKETIME_LIBS
from tests.store.conftest import RecordingObserver
from tests.support.redis_server import REQUIRE_REDIS, PrivateRedis, free_port

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

WINDOW_MS = 10_000
RATE = RateBucket("t:{k1}:r:rpm", 5, WINDOW_MS)
SLOTS = SlotBucket("t:{k1}:s:requests", 2)
LEASE = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """The offset libfaketime reads from its timestamp file at every clock call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.set(0)

    def set(self, seconds: int) -> None:
        self.offset = seconds
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{seconds:+d}\n")
        tmp.replace(self.path)  # atomic: the server never reads half a line


SHIM = Path(__file__).resolve().parents[1] / "support" / "libc_malloc_shim.c"


@contextmanager
def redis_with_movable_clock() -> Iterator[tuple[PrivateRedis, Clock]]:
    library = next((path for path in FAKETIME_LIBS if os.path.exists(path)), None)
    binary, compiler = shutil.which("redis-server"), shutil.which("cc")
    if library is None or binary is None or compiler is None:
        if REQUIRE_REDIS or os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1":
            pytest.fail("redis-server, libfaketime (Debian package faketime) and cc (gcc) are required")
        pytest.skip("redis-server, libfaketime or a C compiler not installed")
    workdir = tempfile.mkdtemp(prefix="gw-redis-clock-")
    shim = Path(workdir) / "libc_malloc_shim.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-nostdlib", "-o", str(shim), str(SHIM)], check=True)
    clock = Clock(Path(workdir) / "faketime")
    env = dict(os.environ, LD_PRELOAD=f"{shim} {library}", FAKETIME_TIMESTAMP_FILE=str(clock.path),
               FAKETIME_NO_CACHE="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    server = PrivateRedis(port, process, workdir)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                server.client().ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("redis-server under libfaketime did not start")
                time.sleep(0.05)
        yield server, clock
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


async def test_a_clock_that_jumps_forward_and_back() -> None:
    with redis_with_movable_clock() as (server, clock):
        client = server.client()
        observer = RecordingObserver()
        store = RedisStore(server.url, prefix="t", timeout=1.0, lease=LEASE, observer=observer)
        await store.start()
        try:
            # The file moves Redis's clock, and only Redis's.
            before = redis_time(client)
            clock.set(3600)
            assert 3590 < redis_time(client) - before < 3610

            clock.set(0)
            assert sum([(await store.admit([RATE], [], f"r{n}")).admitted for n in range(6)]) == 5
            held = [f"s{n}" for n in range(2)]
            assert all([(await store.admit([], [SLOTS], lease)).admitted for lease in held])
            assert not (await store.admit([], [SLOTS], "s-full")).admitted

            # Forward one hour.
            clock.set(3600)
            rate_after = sum([(await store.admit([RATE], [], f"f{n}")).admitted for n in range(6)])
            lost = await store.renew()  # the heartbeat finds its two leases expired
            slots_after = [await store.admit([], [SLOTS], f"fs{n}") for n in range(3)]
            reclaimed = sum(result.reclaimed for result in slots_after)
            admitted_slots = sum(result.admitted for result in slots_after)
            for n, result in enumerate(slots_after):
                if result.admitted:
                    store.release([SLOTS], f"fs{n}")
            for lease in held:
                store.release([SLOTS], lease)
            await store.flush()

            # Back one hour (to the original clock, so now an hour behind the entries just written).
            clock.set(0)
            refused = await store.admit([RATE], [], "b0")
            slot_back = await store.admit([], [SLOTS], "bs")
            store.release([SLOTS], "bs")
            await store.flush()
            members_after_release = client.zcard(SLOTS.key)
        finally:
            await store.aclose()
    print(f"\n[Redis clock +1 h] rate 5/10s full before: {rate_after} more admitted at once; "
          f"2 leases held: {lost} counted lost by the heartbeat, {reclaimed} reclaimed "
          f"(the slot set's key had expired too: {reclaimed == 0}), {admitted_slots} new slots admitted (N=2)")
    print(f"[Redis clock -1 h] the window refuses: Retry-After {refused.retry_after_ms} ms "
          f"(J + window = {3600_000 + WINDOW_MS} ms at most); slots admit ({slot_back.admitted}), "
          f"a release frees at once ({members_after_release} members left)")
    assert rate_after == 5  # a whole limit again: the window looks empty
    # Both leases look expired: counted lost, and their slots taken again (reclaimed by the next
    # admission, or gone with their key, which Redis expires by the same clock).
    assert lost == 2 and reclaimed in (0, 2) and admitted_slots == 2
    assert not refused.admitted and refused.reason == "rate"
    assert 3600_000 < refused.retry_after_ms <= 3600_000 + WINDOW_MS
    assert slot_back.admitted and members_after_release == 0
