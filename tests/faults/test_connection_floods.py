"""Connection floods against real gateway processes: idle connections opened as fast as a
client can, from one address and from many (gateway/connection_limits.py).

What must hold: a client over `max_connections_per_client` gets the 503 JSON answer, not a
reset, and every other client is served; a flood up to the process's open-file limit is
refused at `max_client_connections` with the same answer, while requests on connections
already open are admitted by the store and forwarded upstream, both of which need new
descriptors (a Redis reconnect, new upstream connections); a flood's refusals write a few log
lines, not one each; and every bound comes back once the flood closes (no count leaks).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from gateway.connection_limits import ADMIN_CONNECTIONS
from tests.faults.conftest import BIG_KEY, SMALL_KEY, fault_config, gateway_for, upstream_stats
from tests.support.processes import Proc, wait_until_in_flight
from tests.support.redis_server import private_redis

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

REQUEST = b"GET /hold?ms=%d HTTP/1.1\r\nHost: gw\r\nX-API-Key: %s\r\n\r\n"


class Sockets(list[socket.socket]):
    """Every client socket a test opened, closed at its end whatever happened."""

    def connect(self, proc: Proc, source: str = "127.0.0.1", *, admin: bool = False) -> socket.socket:
        port = proc.admin_port if admin else proc.port
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.append(sock)
        return sock


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    opened = Sockets()
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def ask(sock: socket.socket, hold_ms: int = 0, request: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on `sock` and its whole answer: status, headers, body ((0, {}, b"") when the
    connection ended without one)."""
    try:
        sock.sendall(request or REQUEST % (hold_ms, BIG_KEY.encode()))
    except OSError:
        pass  # already closed by the gateway: its answer may still be readable
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, {}, received
            received += chunk
    except OSError:
        return 0, {}, received
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_gateway(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except OSError:
        return True


def metric(proc: Proc, name: str) -> float:
    text = httpx.get(proc.admin_url + "/metrics", timeout=5).text
    found = re.search(r"^" + re.escape(name) + r" ([0-9.e+]+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def refused(proc: Proc, limit: str) -> float:
    return metric(proc, f'gateway_connections_refused_total{{limit="{limit}",port="public"}}')


def refusal_lines(proc: Proc) -> list[str]:
    return [line for line in proc.log().splitlines() if "public port: refused" in line]


@pytest.fixture
def redis_url() -> Iterator[str]:
    with private_redis() as server:
        yield server.url


def test_a_client_over_its_connection_bound_gets_503_and_every_other_client_is_served(
    tmp_path: Path, upstream: str, redis_url: str, sockets: Sockets
) -> None:
    config = fault_config(upstream, redis_url, max_connections_per_client=20)
    config["plans"]["big"]["limits"]["requests"]["concurrency"] = 10  # at most the bound (checked at load)
    config["plans"]["small"]["limits"]["requests"]["concurrency"] = 2
    with gateway_for(tmp_path, config) as proc, ThreadPoolExecutor(8) as pool:
        idle = [sockets.connect(proc) for _ in range(20)]  # 127.0.0.1 holds its 20
        time.sleep(0.3)
        assert metric(proc, "gateway_client_connections") == 20
        before = int(upstream_stats(upstream, "big").get("total", 0))

        over = sockets.connect(proc)
        status, headers, body = ask(over)
        assert status == 503, (status, headers, body)
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {
            "success": False, "error": "too_many_connections", "retryAfterSeconds": 1,
            "message": "This client address holds too many open connections to the gateway; reuse them, or close some.",
        }
        assert closed_by_gateway(over)
        # nothing of it reached the upstream; the refused connection was never counted
        assert int(upstream_stats(upstream, "big").get("total", 0)) == before
        assert metric(proc, "gateway_client_connections") == 20
        assert refused(proc, "per_client") == 1 and refused(proc, "total") == 0

        # other addresses are served meanwhile, several at once
        others = [sockets.connect(proc, f"127.0.0.{n}") for n in range(2, 10)]
        answers = list(pool.map(lambda sock: ask(sock, 100)[0], others))
        assert answers == [200] * 8
        # and so is 127.0.0.1 on a connection it already holds (keep-alive, twice)
        assert ask(idle[0])[0] == 200 and ask(idle[0])[0] == 200

        # the bound follows closes: five freed, five more admitted, the sixth refused again
        for sock in idle[15:]:
            sock.close()
        time.sleep(0.3)
        again = [sockets.connect(proc) for _ in range(5)]
        assert [ask(sock)[0] for sock in again] == [200] * 5
        assert ask(sockets.connect(proc))[0] == 503
        assert refused(proc, "per_client") == 2
        for sock in idle[:15] + again + others:
            sock.close()
        time.sleep(0.3)
        assert metric(proc, "gateway_client_connections") == 0
    # the log counts both refusals: the second's summary, not due yet when the gateway stopped,
    # is written at exit
    counts = [int(re.search(r"refused (\d+) connection", line).group(1)) for line in refusal_lines(proc)]  # type: ignore[union-attr]
    assert sum(counts) == 2, refusal_lines(proc)


def test_a_flood_to_the_open_file_limit_is_refused_with_503_and_open_connections_keep_working(
    tmp_path: Path, upstream: str, redis_url: str, sockets: Sockets
) -> None:
    """1,024 open files; the default `max_client_connections` leaves room for the upstream pool
    (64) and the gateway's own descriptors. 1,500 idle connections from 50 addresses (30 each:
    under the per-client bound) would take every descriptor: they are refused past the bound,
    and 20 clients holding connections from before get their requests admitted by Redis, whose
    connections are cut during the flood (the gateway must reconnect), and forwarded over new
    upstream connections."""
    config = fault_config(upstream, redis_url, on_error="deny")
    with gateway_for(tmp_path, config, open_files=1024) as proc, ThreadPoolExecutor(20) as pool:
        assert "at most 448 in all" in proc.log()  # 1024 - 512 reserved - the pool of 64
        clients = [sockets.connect(proc, "127.0.0.200") for _ in range(20)]
        assert ask(clients[0])[0] == 200

        flood: list[socket.socket] = []
        for n in range(50):
            for _ in range(30):
                try:
                    flood.append(sockets.connect(proc, f"127.0.1.{n + 1}"))
                except OSError:
                    pass  # a connection the gateway closed at once can fail here already
        time.sleep(1.5)  # refused connections waiting for a request have been answered
        refused_total = refused(proc, "total")
        assert refused_total >= 1500 + 20 - 448, refused_total
        assert metric(proc, "gateway_client_connections") <= 448
        # a refused connection is answered, not reset: the ones that waited for a request
        # show the 503; the rest were answered at the accept
        answered = [ask(sock)[0] for sock in flood[-200:]]
        assert set(answered) <= {0, 503} and answered.count(503) >= 100, answered

        # the store's connections are cut: the next admissions need a reconnect
        with redis_client(redis_url) as client:
            client.client_kill_filter(_type="normal", skipme=True)
            admitted_before = evalsha_calls(client)
            statuses = list(pool.map(lambda sock: ask(sock, 200)[0], clients))
            # on_error: deny, so a 200 was admitted by Redis itself, over a new connection
            assert statuses == [200] * 20, statuses
            assert evalsha_calls(client) >= admitted_before + 20

        for sock in flood:
            sock.close()
        time.sleep(0.5)
        fresh = sockets.connect(proc, "127.0.2.1")
        assert ask(fresh)[0] == 200
        fresh.close()
        for sock in clients:
            sock.close()
    # thousands of refusals, a few lines: the first, then at most one per 10 s
    assert 1 <= len(refusal_lines(proc)) <= 3, refusal_lines(proc)


def test_the_admin_port_has_its_own_bound_and_a_flood_of_it_leaves_the_public_port_alone(
    tmp_path: Path, upstream: str, redis_url: str, sockets: Sockets
) -> None:
    healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with gateway_for(tmp_path, fault_config(upstream, redis_url)) as proc:
        held = [sockets.connect(proc, admin=True) for _ in range(ADMIN_CONNECTIONS)]
        time.sleep(0.3)
        status, _, body = ask(sockets.connect(proc, admin=True), request=healthz)
        assert (status, json.loads(body)["error"]) == (503, "connection_limit")
        public = sockets.connect(proc)
        assert ask(public)[0] == 200 and ask(public)[0] == 200
        assert ask(held[0], request=healthz)[0] == 200  # connections it holds still answer
        for sock in held:
            sock.close()
        time.sleep(0.3)
        assert metric(proc, 'gateway_connections_refused_total{limit="total",port="admin"}') == 1
        assert refused(proc, "total") == refused(proc, "per_client") == 0


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_clients_waiting_for_a_slot_with_large_uploads_hold_little_memory_and_are_served_whole(
    tmp_path: Path, upstream: str, redis_url: str
) -> None:
    """60 clients of a one-slot plan with `wait` upload 2 MB each while the slot is held. The
    waiters keep at most the server's read buffer of each body (before: 1 MiB each, 1.8 MB with
    uvicorn's buffer: 200 such waiters held 360 MB); once the slot frees each is served in turn
    with its whole body."""
    config = fault_config(upstream, redis_url, max_request_body="5MB")
    config["plans"]["small"] = {"limits": {"requests": {"concurrency": 1, "wait": "30s"}}}
    httpx.post(upstream + "/_reset")
    bodies = [bytes([n]) * (2 << 20) for n in range(60)]
    with gateway_for(tmp_path, config) as proc, ThreadPoolExecutor(61) as pool, \
            httpx.Client(base_url=proc.url, headers={"X-API-Key": SMALL_KEY}, timeout=60) as client:
        holder = pool.submit(client.get, "/hold?ms=30000")
        wait_until_in_flight(upstream, "small", 1)
        idle = _rss_mib(proc.process.pid)
        uploads = [pool.submit(client.post, "/upload", content=body) for body in bodies]
        time.sleep(2.5)  # every upload has sent what the gateway reads of it while it waits
        waiting = _rss_mib(proc.process.pid) - idle
        assert upstream_stats(upstream, "small")["total"] == 1  # all 60 still waiting
        httpx.post(upstream + "/_release")
        assert holder.result().status_code == 200
        answers = [upload.result() for upload in uploads]
    assert [answer.status_code for answer in answers] == [200] * 60
    assert [answer.json()["sha256"] for answer in answers] == [hashlib.sha256(body).hexdigest() for body in bodies]
    print(f"60 waiters with 2 MB uploads: +{waiting:.0f} MiB")
    assert waiting < 70, f"60 waiters held {waiting:.0f} MiB"


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2)


def evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
