"""The fault proxy itself, against a private redis-server: each mode does what the fault tests
rely on (a test tool that silently relays would make every fault test pass for nothing)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.fault_proxy import FaultProxy
from tests.support.redis_server import PrivateRedis, private_redis

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateRedis]:
    with private_redis() as started:
        yield started


_clients: list[redis.Redis] = []


@pytest.fixture
def proxy(server: PrivateRedis) -> Iterator[FaultProxy]:
    with server.client() as direct:
        direct.flushall()
    with FaultProxy(server.port) as started:
        yield started
    while _clients:
        _clients.pop().close()


def client(proxy: FaultProxy, timeout: float = 0.3) -> redis.Redis:
    made = redis.Redis(port=proxy.port, socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=Retry(NoBackoff(), 0))  # one attempt: redis-py 8 retries 10 times by default
    _clients.append(made)
    return made


def test_pass_relays_and_counts_markers(proxy: FaultProxy) -> None:
    via = client(proxy)
    assert via.ping()
    sha = via.script_load("return 1")
    assert [via.evalsha(sha, 0) for _ in range(3)] == [1, 1, 1]
    assert proxy.count(b"EVALSHA") == 3 and proxy.delivered[b"EVALSHA"] == 3


def test_latency_delays_each_reply_in_order(proxy: FaultProxy) -> None:
    via = client(proxy, timeout=2)
    via.ping()
    proxy.set_mode("latency", latency=0.2)
    started = time.monotonic()
    pipe = via.pipeline(transaction=False)
    for n in range(5):
        pipe.set(f"k{n}", n)
        pipe.get(f"k{n}")
    assert pipe.execute()[1::2] == [b"0", b"1", b"2", b"3", b"4"]
    elapsed = time.monotonic() - started
    assert 0.35 <= elapsed < 1.5  # both ways delayed, once per direction, not once per command


def test_blackhole_delivers_nothing_either_way(proxy: FaultProxy, server: PrivateRedis) -> None:
    via = client(proxy)
    via.ping()
    proxy.set_mode("blackhole")
    with pytest.raises(redis.TimeoutError):
        via.set("blackholed", 1)
    with server.client() as direct:
        assert direct.get("blackholed") is None
    proxy.set_mode("pass")
    fresh = client(proxy)
    assert fresh.ping()


def test_drop_replies_runs_the_command_but_loses_the_answer(proxy: FaultProxy, server: PrivateRedis) -> None:
    via = client(proxy)
    via.ping()
    proxy.set_mode("drop_replies")
    with pytest.raises(redis.TimeoutError):
        via.incr("ran")
    with server.client() as direct:
        assert direct.get("ran") == b"1"


def test_cut_replies_runs_the_command_then_resets_the_connection(proxy: FaultProxy, server: PrivateRedis) -> None:
    via = client(proxy)
    via.ping()
    proxy.set_mode("cut_replies", cuts=1)
    with pytest.raises(redis.ConnectionError):
        via.incr("ran")
    with server.client() as direct:
        assert direct.get("ran") == b"1"  # it ran; only its answer was lost
    assert via.incr("ran") == 2  # the cut is used up: relayed again
    assert proxy.cuts_done == 1


def test_reset_and_refuse(proxy: FaultProxy) -> None:
    via = client(proxy)
    via.ping()
    proxy.set_mode("reset")
    with pytest.raises(redis.ConnectionError):
        via.ping()
    with pytest.raises(redis.ConnectionError):
        client(proxy).ping()
    proxy.set_mode("refuse")
    with pytest.raises(redis.ConnectionError, match="refused|Connection"):
        client(proxy).ping()
    proxy.set_mode("pass")
    assert client(proxy).ping()
