"""The HTTP edge under attack, on raw sockets against a real gateway process (issue 15):
request heads over the limits (431 / 414, before anything else), a 40 MB header from several
connections (memory and another client's latency measured), a client that stops reading its
response and one that trickles its body (slot freed within about `client_timeout`); paths an
upstream may read as traversal; client-IP headers, header bytes and IPv4-mapped peers.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission.identity import hash_key
from gateway.head_limits import MAX_PIPELINED
from tests.faults.conftest import PREFIX, fault_config, gateway_for, upstream_stats
from tests.support.invariants import assert_no_leaks_within
from tests.support.mock_upstream import download_blocks
from tests.support.processes import Proc, mock_upstream
from tests.support.redis_server import PrivateRedis, private_redis
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

KEY = secret("edge")
CLIENT_TIMEOUT = 1.0
SLACK = 1.0  # scheduling noise on a shared 2-core machine


@dataclass
class Setup:
    gateway: Proc
    upstream: str
    redis: PrivateRedis

    def evalsha(self) -> int:
        with self.redis.client() as client:
            return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    def slots_in_use(self) -> int:
        answer = httpx.get(self.gateway.admin_url + "/v1/keys/edge", timeout=5).json()
        return int(answer["active_slots"]["requests"])

    def metric(self, line_start: str) -> float:
        text = httpx.get(self.gateway.admin_url + "/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("edge")
    with mock_upstream() as upstream, private_redis() as redis_server:
        config: dict[str, Any] = fault_config(upstream, redis_server.url, on_error="deny")
        config.update(client_timeout=f"{int(CLIENT_TIMEOUT * 1000)}ms", max_request_body="1MB")
        config["store"]["lease"] = "600s"  # no renewal EVALSHA while a test counts store calls
        config["keys"] = [{"id": "edge", "sha256": hash_key(KEY), "plan": "p"}]
        config["plans"] = {"p": {"limits": {"requests": {"concurrency": 4}}}}
        config["routes"] = [{"path": "/**", "limits": ["requests"]}]
        with gateway_for(tmp, config, "edge") as gateway:
            yield Setup(gateway, upstream, redis_server)


@pytest.fixture
def clean(setup: Setup) -> Iterator[Setup]:
    httpx.post(setup.upstream + "/_reset")
    yield setup
    with setup.redis.client() as client:
        assert_no_leaks_within(client, PREFIX, 3)


def exchange(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, bool]:
    """Send `data`, read until the server closes (True) or `wait` passes (False)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait)
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        except ConnectionResetError:
            pass
        return received, True


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def request(target: str = "/", *lines: str | bytes) -> bytes:
    head = [f"GET {target} HTTP/1.1".encode(), b"Host: gw", f"X-API-Key: {KEY}".encode()]
    head += [line.encode() if isinstance(line, str) else line for line in lines]
    return b"\r\n".join(head) + b"\r\n\r\n"


# --- request head limits -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["one_large_header", "many_small_headers", "too_many_headers"])
def test_a_head_over_the_limits_gets_431_before_anything_else(shape: str, clean: Setup) -> None:
    lines = {
        "one_large_header": [b"X-Big: " + b"a" * 70_000],  # over the 64 KiB head
        "many_small_headers": [f"X-H{i}: {'b' * 900}" for i in range(80)],  # 80 fields, ~73 KiB
        "too_many_headers": [f"X-H{i}: 1" for i in range(101)],  # 104 fields, tiny
    }[shape]
    calls = clean.evalsha()
    received, closed = exchange(clean.gateway.port, request("/", *lines))
    assert status_of(received) == 431 and closed, received[:300]
    assert b"content-type: application/json" in received
    assert b'"success":false,"error":"headers_too_large"' in received
    assert clean.evalsha() == calls and upstream_stats(clean.upstream, "edge").get("total", 0) == 0


def test_a_long_request_target_gets_414(clean: Setup) -> None:
    received, closed = exchange(clean.gateway.port, request("/" + "x" * 17_000))
    assert status_of(received) == 414 and closed and b'"error":"uri_too_long"' in received
    assert upstream_stats(clean.upstream, "edge").get("total", 0) == 0


_NOT_HTTP = {
    "two_content_lengths": request("/", "Content-Length: 3", "Content-Length: 5") + b"abcde",
    "content_length_and_chunked": request("/", "Content-Length: 3", "Transfer-Encoding: chunked")
    + b"3\r\nabc\r\n0\r\n\r\n",
    "negative_length": request("/", "Content-Length: -1"),
    "length_past_2_to_the_64": request("/", "Content-Length: 99999999999999999999999"),
    "bad_chunk_size": request("/", "Transfer-Encoding: chunked") + b"zz\r\nabc\r\n0\r\n\r\n",
    "unknown_transfer_coding": request("/", "Transfer-Encoding: gzip"),
    "control_byte_in_a_value": request("/", b"X-Odd: a\x7fb"),
    "unknown_method": request("/").replace(b"GET", b"FOO", 1),
    "bad_version": request("/").replace(b"HTTP/1.1", b"HTTP/1.x", 1),
}


@pytest.mark.parametrize("name", sorted(_NOT_HTTP))
def test_a_request_the_parser_cannot_read_gets_the_json_400_and_a_close(name: str, clean: Setup) -> None:
    calls = clean.evalsha()
    received, closed = exchange(clean.gateway.port, _NOT_HTTP[name])
    assert status_of(received) == 400 and closed, received[:300]
    assert b"content-type: application/json" in received
    assert b'"success":false,"error":"bad_request"' in received
    assert clean.evalsha() == calls and upstream_stats(clean.upstream, "edge").get("total", 0) == 0
    # Not a warning per request (uvicorn's own answer logged one): a flood must not flood the log.
    assert "Invalid HTTP request received" not in clean.gateway.log()


@pytest.mark.parametrize("valid", [1, 3])
@pytest.mark.parametrize("refused", [b"FOO / HTTP/1.1\r\n\r\n", request("/", b"X-Big: " + b"a" * 70_000)])
def test_a_refused_head_pipelined_behind_valid_requests_is_answered_after_them(
    valid: int, refused: bytes, clean: Setup
) -> None:
    # uvicorn wrote its 400 the moment the parser failed, before the first request's response
    # (the client read it as the answer to its valid request); a 431 used to cut that response,
    # and a 70 KiB head read together with the request before it was not counted at all.
    received, closed = exchange(clean.gateway.port, request("/") * valid + refused)
    assert closed
    statuses = [status_of(b"HTTP/1.1 " + part) for part in received.split(b"HTTP/1.1 ")[1:]]
    assert statuses[:-1] == [200] * valid and statuses[-1] in (400, 431), received[-400:]
    assert received.endswith(b"}") and b'"success":false' in received.rsplit(b"HTTP/1.1 ", 1)[1]
    assert upstream_stats(clean.upstream, "edge").get("total", 0) == valid


def _responses(received: bytes) -> list[bytes]:
    return [b"HTTP/1.1 " + part for part in received.split(b"HTTP/1.1 ")[1:]]


def test_requests_pipelined_past_the_queue_bound_get_503_after_the_queued_answers(clean: Setup) -> None:
    # uvicorn queued every pipelined request, reading on after each answer: no bound at all
    received, closed = exchange(clean.gateway.port, request("/hold?ms=300") + request("/") * (MAX_PIPELINED + 8))
    assert closed
    statuses = [status_of(answer) for answer in _responses(received)]
    assert statuses == [200] * (1 + MAX_PIPELINED) + [503], statuses
    last = _responses(received)[-1]
    assert b"retry-after" not in last.lower() and b"connection: close" in last
    assert json.loads(last.split(b"\r\n\r\n", 1)[1])["error"] == "too_many_pipelined"
    assert upstream_stats(clean.upstream, "edge")["total"] == 1 + MAX_PIPELINED


def test_a_pipelining_flood_on_one_connection_costs_no_memory(clean: Setup) -> None:
    """Before: 5 MB of `GET / HTTP/1.1` sent behind one slow request grew the gateway by 130 MB
    (13 MB: 1.1 GB), every queued request held until the connection closed and the memory kept."""
    pid = clean.gateway.process.pid
    idle_kib = _rss_kib(pid)
    flood = b"GET / HTTP/1.1\r\n\r\n" * (5_000_000 // 18)
    with socket.create_connection(("127.0.0.1", clean.gateway.port)) as sock:
        sock.sendall(request("/hold?ms=500"))
        sock.settimeout(5)
        try:
            sock.sendall(flood)
        except OSError:  # refused and closed: the rest is not read
            pass
        peak_kib = _rss_kib(pid)
        try:
            while sock.recv(65536):
                peak_kib = max(peak_kib, _rss_kib(pid))
        except OSError:
            pass
    assert peak_kib < idle_kib + 20 * 1024, (idle_kib, peak_kib)
    assert upstream_stats(clean.upstream, "edge")["total"] <= 1 + MAX_PIPELINED


@pytest.mark.parametrize("upgrade", [
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13",
    "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
])
def test_an_upgrade_request_is_served_as_plain_http_and_the_next_request_follows(upgrade: str, clean: Setup) -> None:
    # uvicorn answered a WebSocket handshake with a plain-text 500 (the app has no WebSocket) and
    # left the bytes after any other upgrade's head unread: a request pipelined behind it hung.
    received, closed = exchange(clean.gateway.port, request("/first", upgrade) + request("/second", "Connection: close"))
    assert closed
    first, second = _responses(received)
    assert status_of(first) == 200 and status_of(second) == 200, received[:400]
    echoed = json.loads(first.split(b"\r\n\r\n", 1)[1])
    assert echoed["path"] == "/first" and json.loads(second.split(b"\r\n\r\n", 1)[1])["path"] == "/second"
    sent = {name.lower() for name, _ in echoed["headers"]}
    assert not sent & {"upgrade", "connection", "http2-settings"}, sent  # hop-by-hop (or Connection-named)
    assert "Traceback" not in clean.gateway.log() and "Unsupported upgrade" not in clean.gateway.log()


_INNER = request("/smuggled")


@pytest.mark.parametrize("before", [0, 1])
@pytest.mark.parametrize("framing", [f"Content-Length: {len(_INNER)}", "Transfer-Encoding: chunked"])
def test_an_upgrade_request_with_a_body_is_served_with_its_body_and_the_body_is_never_a_request(
    framing: str, before: int, clean: Setup
) -> None:
    # `curl --http2` sends `Upgrade: h2c` on a POST. The parser skips an upgrading request's body:
    # forwarded with its Content-Length and no body, it left the upstream waiting (the slot held);
    # read as the next request, the body (itself a request here) would be smuggled.
    body = _INNER if framing.startswith("Content-Length") else b"%x\r\n%s\r\n0\r\n\r\n" % (len(_INNER), _INNER)
    head = request("/outer", "Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings", "HTTP2-Settings: AAMAAABkAAQAAP__",
                   framing).replace(b"GET", b"POST", 1)
    after = request("/after", "Connection: close")
    received, closed = exchange(clean.gateway.port, request("/") * before + head + body + after)
    assert closed
    responses = _responses(received)
    assert [status_of(r) for r in responses] == [200] * (before + 2), received[:600]
    echoed = [json.loads(r.split(b"\r\n\r\n", 1)[1]) for r in responses]
    assert [e["path"] for e in echoed] == ["/"] * before + ["/outer", "/after"]  # never /smuggled
    assert echoed[before]["body_length"] == len(_INNER)
    assert upstream_stats(clean.upstream, "edge").get("total", 0) == before + 2


def test_an_upgrade_request_whose_body_comes_in_later_writes_is_served_with_it(clean: Setup) -> None:
    head = request("/outer", "Upgrade: h2c", "Connection: Upgrade, close", "Transfer-Encoding: chunked")
    with socket.create_connection(("127.0.0.1", clean.gateway.port)) as sock:
        sock.settimeout(5)
        sock.sendall(head.replace(b"GET", b"POST", 1))
        for part in (b"3\r\nabc\r\n", b"4\r\ndefg\r\n", b"0\r\n\r\n"):
            time.sleep(0.1)
            sock.sendall(part)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert status_of(received) == 200, received[:400]
    echoed = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert echoed["path"] == "/outer" and echoed["body_length"] == 7


def test_an_upgrade_request_with_a_body_it_cannot_frame_gets_400(clean: Setup) -> None:
    head = request("/outer", "Upgrade: h2c", "Connection: Upgrade", "Content-Length: 3", "Content-Length: 5")
    received, closed = exchange(clean.gateway.port, head.replace(b"GET", b"POST", 1) + b"abcde")
    assert closed and [status_of(r) for r in _responses(received)] == [400], received[:400]
    assert b'"error":"bad_request"' in received
    assert upstream_stats(clean.upstream, "edge").get("total", 0) == 0


def test_connect_gets_400(clean: Setup) -> None:
    head = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n"
    received, closed = exchange(clean.gateway.port, head + b"\x16\x03\x01\x00\x05hello")
    assert closed and [status_of(r) for r in _responses(received)] == [400], received[:400]
    assert b'"error":"bad_request"' in received
    assert upstream_stats(clean.upstream, "edge").get("total", 0) == 0


def test_a_chunked_body_that_turns_unreadable_gets_the_400_and_holds_nothing(clean: Setup) -> None:
    # The head was good (the request is in the app, reading its body before admission); then the
    # body's framing breaks. uvicorn's answer was a plain-text 400; `clean` checks nothing is held.
    head = request("/", "Transfer-Encoding: chunked")
    with socket.create_connection(("127.0.0.1", clean.gateway.port)) as sock:
        sock.settimeout(5)
        sock.sendall(head + b"3\r\nabc\r\n")
        time.sleep(0.2)
        sock.sendall(b"zz\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert status_of(received) == 400 and b'"error":"bad_request"' in received, received[:300]


def test_a_head_just_under_the_limits_is_served(clean: Setup) -> None:
    lines = [f"X-H{i}: {'c' * 500}" for i in range(90)]  # 93 fields, ~48 KiB
    received, _ = exchange(clean.gateway.port, request("/" + "y" * 15_000, "Connection: close", *lines))
    assert status_of(received) == 200, received[:300]


def test_an_incomplete_head_is_refused_as_soon_as_it_is_over(clean: Setup) -> None:
    # No end of the head ever comes: the refusal must not wait for it (nor for client_timeout).
    with socket.create_connection(("127.0.0.1", clean.gateway.port)) as sock:
        sock.settimeout(CLIENT_TIMEOUT / 2)
        sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100_000)
        received = sock.recv(65536)
    assert status_of(received) == 431


def test_an_incomplete_target_is_refused_as_soon_as_it_is_over(clean: Setup) -> None:
    with socket.create_connection(("127.0.0.1", clean.gateway.port)) as sock:
        sock.settimeout(CLIENT_TIMEOUT / 2)
        sock.sendall(b"GET /" + b"x" * 30_000)
        received = sock.recv(65536)
    assert status_of(received) == 414


def test_a_small_head_sent_with_a_large_body_in_one_write_is_served(clean: Setup) -> None:
    # More than max_request_headers arrives before the head is parsed; only the head counts.
    body = b"y" * 200_000
    head = (b"POST /upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + KEY.encode()
            + b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    received, _ = exchange(clean.gateway.port, head + body)
    assert status_of(received) == 200 and b'"bytes": 200000' in received


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _latencies(proc: Proc, count: int) -> list[float]:
    times = []
    with httpx.Client(base_url=proc.url, headers={"X-API-Key": KEY}, timeout=10) as client:
        for _ in range(count):
            started = time.perf_counter()
            assert client.get("/").status_code == 200
            times.append(time.perf_counter() - started)
            time.sleep(0.01)
    return times


ATTACKS = {
    "header": b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: ",
    # A keyed request whose chunked body ends in a trailer section: the head's bounds did not see
    # it (uvicorn kept every trailer field, and as a request header), the body cap neither.
    "trailer": b"POST /upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + KEY.encode()
               + b"\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Big: ",
    # The same, in a chunk extension (`1;name=value`): framing the parser skips, neither head nor
    # body (Node.js bounded it after CVE-2024-22019).
    "chunk extension": b"POST /upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + KEY.encode()
                       + b"\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n1;ext=",
}


def _attack(port: int, size: int, stop: threading.Event, where: str = "header") -> None:
    """One connection sending a request with a `size`-byte header field (in its head, without a
    key; or in its trailer section)."""
    chunk = b"a" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        try:
            sock.sendall(ATTACKS[where])
            sent = 0
            while sent < size and not stop.is_set():
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # refused and closed: the rest is not read
            pass


@pytest.mark.parametrize("where", list(ATTACKS))
def test_a_40MB_header_attack_costs_neither_memory_nor_other_clients_latency(where: str, clean: Setup) -> None:
    pid = clean.gateway.process.pid
    _latencies(clean.gateway, 20)  # warm: pooled upstream connections, code paths
    idle_kib = _rss_kib(pid)
    before = _latencies(clean.gateway, 50)

    stop = threading.Event()
    attackers = [threading.Thread(target=_attack, args=(clean.gateway.port, 40 << 20, stop, where))
                 for _ in range(4)]
    peak_kib = idle_kib
    sampling = True

    def sample() -> None:
        nonlocal peak_kib
        while sampling:
            peak_kib = max(peak_kib, _rss_kib(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for attacker in attackers:
        attacker.start()
    try:
        during = _latencies(clean.gateway, 50)
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(10)
        sampling = False
        sampler.join()

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms"

    print(f"\nRSS idle {idle_kib / 1024:.1f} MB, peak under 4 x 40 MB headers {peak_kib / 1024:.1f} MB "
          f"(+{(peak_kib - idle_kib) / 1024:.1f} MB); another client's latency before: {ms(before)}; "
          f"during: {ms(during)}")
    assert peak_kib < idle_kib + 20 * 1024
    assert max(during) < 1.0  # the issue measured 3.35 s; normal is a few ms (figures printed above)


def test_trailer_fields_are_dropped_and_a_trailer_section_over_the_bound_gets_431(clean: Setup) -> None:
    """A chunked body's trailer fields are read and dropped: uvicorn appended them to the
    request's headers, so they reached the upstream as headers (past any front proxy's header
    rules, and after every check of the head). A trailer section past the head's bound
    (`max_request_headers`, 64 KiB here) gets 431, as a head would."""
    head = (b"POST /upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + KEY.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    trailers = b"X-Injected: 1\r\nX-API-Key: another\r\n\r\n"
    received, _ = exchange(clean.gateway.port, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
                           + b"5\r\nhello\r\n0\r\n" + trailers)
    assert status_of(received) == 200 and b'"bytes": 5' in received
    names = [name.lower() for name, _ in upstream_stats(clean.upstream, "edge")["last"]["headers"]]
    assert "x-injected" not in names and "x-api-key" not in names

    # 512 KiB of trailer fields in 8 KiB writes, more than one read's worth
    received, _ = flood(clean.gateway.port, head + b"5\r\nhello\r\n0\r\n", b"X-Pad: " + b"a" * 8180 + b"\r\n", 64,
                        pause=0.001)
    assert status_of(received) == 431 and b'"error":"headers_too_large"' in received, received[:200]


def test_a_chunk_extension_past_the_head_bound_gets_431(clean: Setup) -> None:
    """Chunk extensions are framing bytes between body bytes: past `max_request_headers` (64 KiB
    here) the request is refused with 431, as a trailer section is, not read for as long as the
    client keeps sending."""
    received, writes = flood(clean.gateway.port, ATTACKS["chunk extension"], b"a" * 8192, 512)
    assert status_of(received) == 431 and b'"error":"headers_too_large"' in received, received[:200]
    assert writes < 512  # refused and closed before the 4 MiB were sent (the rest sat in socket buffers)


def flood(port: int, start: bytes, filler: bytes, count: int, pause: float = 0.0) -> tuple[bytes, int]:
    """Send `start`, then `filler` up to `count` times until the server refuses and closes;
    returns what came back and how many fillers were written."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(start)
        writes = 0
        try:
            while writes < count:
                sock.sendall(filler)
                writes += 1
                if pause:
                    time.sleep(pause)
        except OSError:
            pass  # refused and closed: the rest is not read
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received, writes


# --- send and body deadlines ---------------------------------------------------------------------


def _log_shows(proc: Proc, text: str, within: float = 3.0) -> bool:
    """The access log is written a moment after the answer: wait for the line."""
    deadline = time.monotonic() + within
    while text not in proc.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_slots(setup: Setup, count: int, within: float) -> float:
    """Seconds until the key holds `count` slots; fails past `within`."""
    started = time.monotonic()
    while setup.slots_in_use() != count:
        assert time.monotonic() - started < within, f"slots in use: {setup.slots_in_use()}, wanted {count}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_client_that_stops_reading_is_cut_and_frees_its_slot(clean: Setup) -> None:
    stalls = clean.metric('gateway_client_timeouts_total{stage="send"}')
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", clean.gateway.port))
        sock.sendall(request("/download?bytes=200000000"))
        _wait_slots(clean, 1, within=5)
        # Never reads: the gateway's socket buffer fills, its writes stop making progress.
        freed_after = _wait_slots(clean, 0, within=CLIENT_TIMEOUT + 5)
        print(f"\nslot freed {freed_after:.2f} s after admission (client_timeout {CLIENT_TIMEOUT} s)")
        sock.settimeout(2)
        try:
            while sock.recv(1 << 20):  # what was buffered, then the end: the connection is closed
                pass
        except ConnectionResetError:
            pass
    assert clean.metric('gateway_client_timeouts_total{stage="send"}') == stalls + 1
    stats = upstream_stats(clean.upstream, "edge")
    assert stats["disconnects"] == 1 and stats["completed"] == 0  # the upstream request was cancelled
    assert _log_shows(clean.gateway, '"status":408,"outcome":"send_timeout"')


def test_a_client_reading_slowly_but_steadily_is_not_cut(clean: Setup) -> None:
    total = 3_000_000
    with socket.create_connection(("127.0.0.1", clean.gateway.port)) as sock:
        sock.sendall(request(f"/download?bytes={total}", "Connection: close"))
        received = 0
        sock.settimeout(5)
        while chunk := sock.recv(256 * 1024):
            received += len(chunk)
            time.sleep(CLIENT_TIMEOUT / 4)  # pauses shorter than client_timeout
    assert received > total
    assert upstream_stats(clean.upstream, "edge")["completed"] == 1


def test_a_body_trickled_after_the_first_64KiB_is_cut_and_frees_its_slot(clean: Setup) -> None:
    with socket.create_connection(("127.0.0.1", clean.gateway.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + KEY.encode()
                     + b"\r\nContent-Length: 500000\r\n\r\n" + b"x" * 70_000)
        _wait_slots(clean, 1, within=5)
        started = time.monotonic()
        sock.settimeout(0.2)
        received = b""
        while not received and time.monotonic() - started < CLIENT_TIMEOUT + 5:
            try:
                received = sock.recv(65536)
            except TimeoutError:
                sock.send(b"x" * 100)  # 100 bytes every 200 ms: alive, but never done
        elapsed = time.monotonic() - started
    assert status_of(received) == 408 and b'"error":"request_timeout"' in received
    assert elapsed < CLIENT_TIMEOUT + SLACK
    _wait_slots(clean, 0, within=2)
    assert _log_shows(clean.gateway, '"status":408,"outcome":"client_timeout"')


# --- HTTP/1.0 clients ----------------------------------------------------------------------------


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
def test_an_http_1_0_client_gets_a_streamed_body_as_it_was_sent_ending_with_the_close(
        connection: bytes, clean: Setup) -> None:
    """HTTP/1.0 has no chunked coding (ab, old proxies and health checkers speak it): a response
    the upstream streams without a length reaches such a client as the bare body, ended by the
    close. uvicorn alone chunks it, and the client reads the chunk framing as body bytes."""
    total = 200_000
    head = (b"GET /download?bytes=%d&mode=chunked HTTP/1.0\r\nX-API-Key: " % total + KEY.encode() + b"\r\n"
            + connection + b"\r\n")
    received, closed = exchange(clean.gateway.port, head)
    response_head, _, body = received.partition(b"\r\n\r\n")
    lines = response_head.lower().split(b"\r\n")
    assert closed and status_of(received) == 200
    assert not any(line.startswith(b"transfer-encoding") for line in lines), response_head
    assert b"connection: close" in lines
    assert body == b"".join(download_blocks(total))
    # The same over HTTP/1.1 is chunked, and a length from the upstream goes to 1.0 as it is.
    chunked, _ = exchange(clean.gateway.port, request(f"/download?bytes={total}&mode=chunked", "Connection: close"))
    assert b"transfer-encoding: chunked" in chunked.lower().partition(b"\r\n\r\n")[0]
    sized, _ = exchange(clean.gateway.port, head.replace(b"mode=chunked", b"mode=length"))
    assert b"content-length: %d" % total in sized.lower() and sized.endswith(b"".join(download_blocks(total))[-100:])


# --- strict request paths ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/..;/admin", "/v1/.%00./admin", "/v1/%c0%ae%c0%ae/admin",
                                  "/v1/%252e%252e/admin", "/v1/a%5c..%5cadmin",
                                  # decoded to a dot segment or a line break, these matched no route (404) before
                                  "/v1/%2e%2e/admin", "/v1/a%2f..%2fb", "/v1/a%0d%0aX:%201"])
def test_traversal_path_forms_get_400_without_a_store_call(path: str, clean: Setup) -> None:
    calls = clean.evalsha()
    received, _ = exchange(clean.gateway.port, request(path, "Connection: close"))
    assert status_of(received) == 400 and b'"error":"bad_request"' in received, received[:300]
    assert clean.evalsha() == calls and upstream_stats(clean.upstream, "edge").get("total", 0) == 0


def test_a_url_with_dot_segments_in_the_query_passes(clean: Setup) -> None:
    target = "/v1/scrape?url=https%3A%2F%2Fexample.com%2Fa%2F..%2Fb"
    received, _ = exchange(clean.gateway.port, request(target, "Connection: close"))
    assert status_of(received) == 200
    last = upstream_stats(clean.upstream, "edge")["last"]
    assert last["path"] == "/v1/scrape" and last["query"] == "url=https%3A%2F%2Fexample.com%2Fa%2F..%2Fb"


# --- client-IP headers, header bytes, IPv4-mapped peers --------------------------------------


def test_on_a_dual_stack_listener_the_client_is_ipv4_and_its_headers_arrive_as_sent(
    tmp_path: Path, setup: Setup
) -> None:
    config: dict[str, Any] = fault_config(setup.upstream, "memory://")
    config["keys"] = [{"id": "edge", "sha256": hash_key(KEY), "plan": "p"}]
    config["plans"] = {"p": {"limits": {"requests": {"concurrency": 4}}}}
    config["routes"] = [{"path": "/**", "limits": ["requests"]}]
    config["bans"] = {"strikes": 100}  # the resolved client appears in the access log
    httpx.post(setup.upstream + "/_reset")
    spoofed = [f"{name}: 6.6.6.6" for name in (
        "True-Client-IP", "CF-Connecting-IP", "X-Real-IP", "X-Client-IP", "Forwarded",
        "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Prefix")]
    with gateway_for(tmp_path, config, "dual", listen_host="[::]") as proc:
        received, _ = exchange(proc.port, request("/echo", "Connection: close", *spoofed,
                                                  b"X-Latin: \xff\xfe\x80"))
        assert status_of(received) == 200, received[:300]
    log = proc.log()  # once stopped: every access-log line flushed
    headers = upstream_stats(setup.upstream, "edge")["last"]["headers"]
    by_name = {name.lower(): value for name, value in headers}
    assert by_name["x-forwarded-for"] == "127.0.0.1"  # was ::ffff:127.0.0.1
    assert "6.6.6.6" not in json.dumps(headers)  # no client-chosen address reaches the upstream
    assert by_name["x-latin"].encode("latin-1") == b"\xff\xfe\x80"  # was c3 bf c3 be c2 80
    assert '"client":"127.0.0.1"' in log and "::ffff:" not in log


# --- fuzzed request heads ------------------------------------------------------------------------

_METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"])
_ODD_METHODS = st.from_regex(rb"\A[A-Za-z!#$%&'*+.^_`|~-]{1,10}\Z") | st.binary(min_size=1, max_size=6)
_PIECES = st.sampled_from([b"/", b"v1", b"scrape", b"a.b", b".", b"..", b";x", b"%2e", b"%2E%2e", b"%252e",
                           b"%c0%ae", b"%00", b"%5c", b"%2f", b"%25", b"%", b"?url=https%3A%2F%2Fx.io%2F..%2F",
                           b"&a=1", b"\xc3\xa9"])
def _head(version: bytes, *hosts: bytes) -> bytes:
    lines = [b"GET / " + version, *(b"Host: " + host for host in hosts), f"X-API-Key: {KEY}".encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


_BAD_HOSTS = {
    "http_1_1_without_host": _head(b"HTTP/1.1"),
    "two_hosts": _head(b"HTTP/1.1", b"gw", b"gw"),
    "two_different_hosts": _head(b"HTTP/1.1", b"localhost", b"evil.example"),
    "two_hosts_http_1_0": _head(b"HTTP/1.0", b"gw", b"other"),
    "a_path_in_the_host": _head(b"HTTP/1.1", b"gw/admin"),
    "userinfo_in_the_host": _head(b"HTTP/1.1", b"user@gw"),
    "a_space_in_the_host": _head(b"HTTP/1.1", b"gw evil"),
    "a_backslash_in_the_host": _head(b"HTTP/1.1", b"gw\\evil"),
    "non_ascii_host": _head(b"HTTP/1.1", "gw\u00e9".encode()),
}


@pytest.mark.parametrize("name", sorted(_BAD_HOSTS))
def test_a_missing_duplicate_or_invalid_host_gets_the_json_400_before_anything_else(name: str, clean: Setup) -> None:
    # RFC 9112 §3.2: a server MUST answer 400 to these. Before, each was served (200).
    calls = clean.evalsha()
    received, closed = exchange(clean.gateway.port, _BAD_HOSTS[name])
    assert status_of(received) == 400 and closed, received[:300]
    assert b'"success":false,"error":"bad_request"' in received and b"Host header" in received
    assert clean.evalsha() == calls and upstream_stats(clean.upstream, "edge").get("total", 0) == 0


@pytest.mark.parametrize("head", [
    _head(b"HTTP/1.1", b"api.example.com"), _head(b"HTTP/1.1", b"127.0.0.1:8080"), _head(b"HTTP/1.1", b"[::1]:8080"),
    _head(b"HTTP/1.1", b""),  # a target without an authority (RFC 9110 §7.2)
    _head(b"HTTP/1.0"),  # HTTP/1.0 has no Host requirement (ApacheBench, old health checkers)
], ids=["name", "ipv4_and_port", "ipv6_and_port", "empty", "http_1_0_without_host"])
def test_a_valid_host_or_none_on_http_1_0_is_served(head: bytes, clean: Setup) -> None:
    received, closed = exchange(clean.gateway.port, head)
    assert status_of(received) == 200 and closed, received[:300]


_BAD_PIECES = st.sampled_from([b" ", b"\x00", b"\x7f", b"\xff", b"#", b"\\", b"\t"])
_NAMES = st.sampled_from([b"X-API-Key", b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect",
                          b"Connection", b"X-Forwarded-For", b"Forwarded", b"True-Client-IP", b"Accept"]) | \
    st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}\Z")
_VALUES = st.from_regex(rb"\A[\x20-\x7e\x80-\xff]{0,24}\Z") | \
    st.sampled_from([KEY.encode(), b"chunked", b"100-continue", b"0", b"5", b"close", b"1.2.3.4, ::ffff:1.2.3.4"])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """Mostly well-formed heads with hostile parts (paths, sizes, counts, framing headers), and
    now and then a malformed method, target byte, version, name or value."""
    odd = draw(st.integers(0, 4)) == 0
    method = draw(_ODD_METHODS if odd and draw(st.booleans()) else _METHODS)
    pieces = draw(st.lists(_PIECES | (_BAD_PIECES if odd else _PIECES), max_size=10))
    target = b"/" + b"".join(pieces)
    if draw(st.integers(0, 9)) == 0:
        target += b"x" * draw(st.integers(10_000, 20_000))  # near and over max_request_line
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"HTP/1.1"])
                   if odd else st.just(b"HTTP/1.1"))
    headers = draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=8))
    if odd:
        headers.append((draw(st.binary(min_size=1, max_size=6)), draw(st.binary(max_size=12))))
    if draw(st.integers(0, 3)):
        headers.append((b"X-API-Key", KEY.encode()))
    if draw(st.integers(0, 7)) == 0:
        headers.append((b"X-Big", b"a" * draw(st.integers(60_000, 70_000))))  # around max_request_headers
    if draw(st.integers(0, 7)) == 0:
        headers.extend((b"X-N%d" % i, b"1") for i in range(draw(st.integers(95, 105))))  # around the count
    lines = [method + b" " + target + b" " + version, *(name + b": " + value for name, value in headers)]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads())
def test_fuzzed_request_heads_get_an_answer_never_a_5xx_hang_or_traceback(setup: Setup, head: bytes) -> None:
    # A head that declares a body it does not send waits for client_timeout (408): allowed.
    received, closed = exchange(setup.gateway.port, head, wait=CLIENT_TIMEOUT + 5)
    assert closed, f"no close within {CLIENT_TIMEOUT + 5}s: {head[:200]!r}"
    assert status_of(received) < 500, (head[:300], received[:300])
    assert "Traceback" not in setup.gateway.log()

