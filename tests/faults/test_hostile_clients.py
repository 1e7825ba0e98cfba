"""Hostile clients on raw sockets against real gateway processes: bodies over the cap,
slowloris headers, slow bodies, request-smuggling shapes, control characters in headers.

What must hold: the answer is the documented one (413, 408, 400) and the connection closes;
nothing reaches the upstream that the client did not send as a complete, valid request; and a
slow or malformed request costs no store call (EVALSHA, counted by a private Redis) and holds no
slot while it dawdles.
"""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admission.identity import hash_key
from tests.faults.conftest import PREFIX, fault_config, gateway_for, get, upstream_stats
from tests.support.invariants import assert_no_leaks_within
from tests.support.processes import Proc, mock_upstream
from tests.support.redis_server import PrivateRedis, private_redis
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

KEY = secret("hostile")
ROOMY = secret("hostile-roomy")  # 10 slots: pipelined requests don't race a release
CLIENT_TIMEOUT = 1.0
SLACK = 0.6


@dataclass
class Setup:
    small: Proc  # max_request_body 1KB
    large: Proc  # max_request_body 256KB: bodies stream past the 64 KiB read before admission
    upstream: str
    redis: PrivateRedis

    def evalsha(self) -> int:
        with self.redis.client() as client:
            return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    def upstream_total(self) -> int:
        return int(upstream_stats(self.upstream, "hostile").get("total", 0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("hostile")
    with mock_upstream() as upstream, private_redis() as redis_server:
        def config(cap: str) -> dict[str, Any]:
            made: dict[str, Any] = fault_config(upstream, redis_server.url, on_error="deny")
            made.update(client_timeout=f"{int(CLIENT_TIMEOUT * 1000)}ms", max_request_body=cap)
            # No lease renewal (also an EVALSHA) may land while a test counts admissions.
            made["store"]["lease"] = "600s"
            made["keys"] = [{"id": "hostile", "sha256": hash_key(KEY), "plan": "p"},
                            {"id": "roomy", "sha256": hash_key(ROOMY), "plan": "roomy"}]
            made["plans"] = {"p": {"limits": {"requests": {"concurrency": 1}}},
                             "roomy": {"limits": {"requests": {"concurrency": 10}}}}
            made["routes"] = [{"path": "/**", "limits": ["requests"]}]
            return made

        with gateway_for(tmp, config("1KB"), "small") as small, \
                gateway_for(tmp, config("256KB"), "large") as large:
            yield Setup(small, large, upstream, redis_server)


@pytest.fixture
def clean(setup: Setup) -> Iterator[Setup]:
    httpx.post(setup.upstream + "/_reset")
    yield setup
    with setup.redis.client() as client:
        assert_no_leaks_within(client, PREFIX, 2)  # every slot released after each test


def upstream_settled(setup: Setup) -> dict[str, Any]:
    """The upstream's counters once it has no request in flight (it may see an abandoned upload
    end a moment after the client got its answer)."""
    deadline = time.monotonic() + 3
    while True:
        stats = upstream_stats(setup.upstream, "hostile")
        if stats.get("in_flight", 0) == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def exchange(port: int, data: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """Send `data`, read until the server closes (True) or `wait` passes (False)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait)
        sock.sendall(data)
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


def head(method: str, path: str, *lines: str) -> bytes:
    text = f"{method} {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
    return (text + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


# --- bodies over max_request_body -------------------------------------------------------------


def test_body_over_the_cap_by_content_length_gets_413_first(clean: Setup) -> None:
    calls = clean.evalsha()
    response, closed = exchange(clean.small.port, head("POST", "/upload", "Content-Length: 2000"))
    assert status_of(response) == 413 and b'"error":"body_too_large"' in response and closed
    assert clean.upstream_total() == 0 and clean.evalsha() == calls


def test_chunked_body_over_the_cap_gets_413_before_the_upstream_sees_anything(clean: Setup) -> None:
    calls = clean.evalsha()
    chunks = b"".join(b"200\r\n" + b"x" * 512 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    request = head("POST", "/upload", "Transfer-Encoding: chunked") + chunks
    response, closed = exchange(clean.small.port, request)
    assert status_of(response) == 413 and closed
    assert clean.upstream_total() == 0 and clean.evalsha() == calls


def test_chunked_body_over_a_large_cap_never_reaches_the_upstream_complete(clean: Setup) -> None:
    """Past the 64 KiB read before admission the body streams; crossing the cap then abandons
    the upstream request mid-body (it never sees a complete one) and answers 413."""
    block = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"  # 16 KiB chunks, 320 KiB in all
    response, closed = exchange(clean.large.port, head("POST", "/upload", "Transfer-Encoding: chunked")
                                + block * 20 + b"0\r\n\r\n")
    assert status_of(response) == 413 and closed
    stats = upstream_settled(clean)
    assert stats["completed"] == 0 and stats["incomplete_bodies"] == stats["total"] == 1


def test_expect_100_continue_is_refused_before_the_body_is_asked_for(clean: Setup) -> None:
    """A client that waits for 100 Continue is admitted first: a 429 costs it no upload."""
    with socket.create_connection(("127.0.0.1", clean.small.port)) as holder:
        holder.sendall(head("GET", "/hold?ms=5000"))
        deadline = time.monotonic() + 5
        while upstream_stats(clean.upstream, "hostile").get("in_flight") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        response, _ = exchange(clean.small.port, head("POST", "/upload", "Content-Length: 500",
                                                      "Expect: 100-continue", "Connection: close"))
        assert status_of(response) == 429 and b"100 Continue" not in response
        httpx.post(clean.upstream + "/_release")
        assert holder.recv(65536).startswith(b"HTTP/1.1 200")


def test_expect_100_continue_then_silence_is_cut_and_frees_the_slot(clean: Setup) -> None:
    with socket.create_connection(("127.0.0.1", clean.small.port)) as sock:
        sock.sendall(head("POST", "/upload", "Content-Length: 500", "Expect: 100-continue"))
        sock.settimeout(CLIENT_TIMEOUT + 2)
        started = time.monotonic()
        received = _drain(sock)
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 408 ")  # admitted, then cut
    assert elapsed < CLIENT_TIMEOUT + SLACK
    assert get(clean.small, KEY).status_code == 200  # the one slot is free again


# --- slow clients -------------------------------------------------------------------------------


def test_slowloris_headers_are_cut_without_a_store_call(clean: Setup) -> None:
    """20 connections sending their headers a byte at a time, and one sending nothing, while a
    normal client is served: the slow ones are closed at the deadline (408 when a request had
    begun), never reach admission, and the normal client never waits for them."""
    calls = clean.evalsha()
    partial = head("GET", "/")[:-4]  # everything but the final CRLF CRLF
    slow = [socket.create_connection(("127.0.0.1", clean.small.port)) for _ in range(20)]
    idle = socket.create_connection(("127.0.0.1", clean.small.port))
    started = time.monotonic()
    served = 0
    try:
        for sock in slow:
            sock.setblocking(False)
        sent = 0
        while time.monotonic() - started < CLIENT_TIMEOUT + SLACK:
            answered = set(select.select(slow, [], [], 0)[0])
            for sock in slow:  # one more header byte each, every 100 ms, until answered
                if sock in answered:
                    continue  # writing after the gateway's close would draw a reset
                try:
                    stream = partial if sent < len(partial) else b"X-Slow: 1\r\n"
                    position = sent if sent < len(partial) else sent % 11
                    sock.send(stream[position:position + 1])
                except OSError:
                    pass  # closed by the gateway: expected
            sent += 1
            response = get(clean.small, KEY)  # others are served all along
            assert response.status_code == 200 and response.elapsed.total_seconds() < 0.5
            served += 1
            time.sleep(0.1)
        for sock in [*slow, idle]:
            sock.setblocking(True)
            sock.settimeout(2)
        answers = [_drain(sock) for sock in slow]
        for answer in answers:
            assert status_of(answer) == 408 and b'"error":"request_timeout"' in answer, answer
        assert _drain(idle) == b""  # nothing had begun: closed without an answer
        cut_after = time.monotonic() - started
    finally:
        for sock in [*slow, idle]:
            sock.close()
    assert clean.evalsha() == calls + served  # one store call per normal request, none for the slow
    assert clean.upstream_total() == served
    print(f"\n[slowloris] 20 slow + 1 idle connection cut within {cut_after:.2f}s "
          f"(client_timeout {CLIENT_TIMEOUT}s); {served} normal requests served meanwhile")


@pytest.mark.parametrize("how", ["half_close", "close", "pipelined_half_close"])
def test_a_request_sent_with_its_fin_is_not_forwarded_and_holds_nothing(how: str, clean: Setup) -> None:
    """A FIN right behind the request (`nc -N`, socat, a client timing out as it sends) is read
    as the client leaving, as nginx does: no answer, nothing reaches the upstream, the slot is
    free at once. (It may be admitted first, one store call, and that counts against its rate,
    as any admission does: the decision was made while the client was there.)"""
    calls = clean.evalsha()
    count = 2 if how == "pipelined_half_close" else 1
    for _ in range(20):  # every time, not once by luck of scheduling
        with socket.create_connection(("127.0.0.1", clean.small.port)) as sock:
            sock.sendall(head("GET", "/") * count)
            if how == "close":
                sock.close()
                continue
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(3)
            assert _drain(sock) == b""  # closed without an answer
    time.sleep(0.3)  # a forwarded request would have reached the upstream by now
    assert clean.upstream_total() == 0 and clean.evalsha() <= calls + 20
    assert get(clean.small, KEY).status_code == 200  # the one slot is free


def test_a_slow_head_on_a_reused_connection_is_cut_too(clean: Setup) -> None:
    """uvicorn's keep-alive timer stops at the next request's first byte; the deadline takes over."""
    with socket.create_connection(("127.0.0.1", clean.small.port)) as sock:
        sock.settimeout(CLIENT_TIMEOUT + 2)
        sock.sendall(head("GET", "/"))
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        head_part, _, rest = first.partition(b"\r\n\r\n")
        length = int(head_part.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(rest) < length:
            rest += sock.recv(65536)
        assert status_of(first) == 200
        calls = clean.evalsha()
        sock.sendall(head("GET", "/")[:20])  # the next request's head, never finished
        started = time.monotonic()
        received = _drain(sock)
        elapsed = time.monotonic() - started
    assert status_of(received) == 408
    assert CLIENT_TIMEOUT - 0.1 < elapsed < CLIENT_TIMEOUT + SLACK
    assert clean.evalsha() == calls


def _drain(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_slow_body_is_cut_before_admission(clean: Setup) -> None:
    calls = clean.evalsha()
    with socket.create_connection(("127.0.0.1", clean.small.port)) as sock:
        sock.sendall(head("POST", "/upload", "Content-Length: 100") + b"x" * 10)
        started = time.monotonic()
        sock.settimeout(0.3)
        received = b""
        while not received and time.monotonic() - started < CLIENT_TIMEOUT + 2:
            try:
                received = sock.recv(65536)
            except TimeoutError:
                sock.send(b"x")  # a byte every 300 ms: alive, but never done
        elapsed = time.monotonic() - started
        sock.settimeout(2)
        received += _drain(sock)  # the rest of the answer, up to the close
    assert status_of(received) == 408 and b'"error":"request_timeout"' in received
    assert CLIENT_TIMEOUT - 0.1 < elapsed < CLIENT_TIMEOUT + SLACK
    assert clean.evalsha() == calls and clean.upstream_total() == 0  # no store call, no upstream


def test_body_stalling_after_the_first_64KiB_is_cut_and_frees_its_slot(clean: Setup) -> None:
    with socket.create_connection(("127.0.0.1", clean.large.port)) as sock:
        sock.sendall(head("POST", "/upload", "Content-Length: 200000") + b"x" * 70_000)
        sock.settimeout(CLIENT_TIMEOUT + 2)
        started = time.monotonic()
        received = _drain(sock)
        elapsed = time.monotonic() - started
    assert status_of(received) == 408 and b'"error":"request_timeout"' in received
    assert elapsed < CLIENT_TIMEOUT + SLACK
    stats = upstream_settled(clean)
    assert stats["total"] == 1 and stats["completed"] == 0 and stats["incomplete_bodies"] == 1
    assert get(clean.large, KEY).status_code == 200  # the one slot is free again


# --- bodies of requests answered before their body was read --------------------------------------
# The server reads such a body and throws it away (so the connection can serve the next request);
# it must keep a body's pace, and the connection gets its keep-alive timeout once it has ended.

ANSWERED_EARLY = {
    # (path, key): a 401 before anything of the body is read; an upstream answering before reading
    "unauthorized": ("/upload", "not-a-key"),
    "upstream_answered_early": ("/early_response?status=200", KEY),
}


def _answer(sock: socket.socket) -> int:
    """Read one whole answer (head and Content-Length body); its status."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head_bytes).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return status_of(head_bytes)


def _answered_early(port: int, case: str, length: int) -> socket.socket:
    path, key = ANSWERED_EARLY[case]
    sock = socket.create_connection(("127.0.0.1", port))
    text = f"POST {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nContent-Length: {length}\r\n\r\n"
    sock.sendall(text.encode() + b"x" * 70_000)
    sock.settimeout(5)
    assert _answer(sock) == (401 if case == "unauthorized" else 200)
    return sock


@pytest.mark.parametrize("case", list(ANSWERED_EARLY))
def test_an_answered_body_trickled_on_is_cut_at_a_bodys_pace(case: str, clean: Setup) -> None:
    """Before: a byte every 200 ms held the connection for ever (uvicorn's keep-alive timer is
    cancelled by every read, and nothing else watched a body nobody reads)."""
    with _answered_early(clean.large.port, case, 200_000) as sock:
        started = time.monotonic()
        sock.settimeout(0.2)
        closed = False
        while not closed and time.monotonic() - started < CLIENT_TIMEOUT + 3:
            try:
                sock.send(b"x")
                closed = sock.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed = True
        elapsed = time.monotonic() - started
    assert closed, "the connection outlived its body's deadline"
    assert CLIENT_TIMEOUT - 0.1 < elapsed < CLIENT_TIMEOUT + SLACK + 0.2


@pytest.mark.parametrize("case", list(ANSWERED_EARLY))
def test_an_answered_body_that_never_goes_on_is_cut_after_client_timeout_not_keep_alive(
    case: str, clean: Setup
) -> None:
    """Part of the body came with the head, the answer went out, then nothing more. Before: the
    connection was held for `client_keep_alive` (75 s by default: uvicorn's timer, armed by the
    answer), not the body's `client_timeout`."""
    with _answered_early(clean.large.port, case, 200_000) as sock:
        started = time.monotonic()
        sock.settimeout(CLIENT_TIMEOUT + 5)
        assert _drain(sock) == b""  # closed, with nothing more said: its answer was given
        elapsed = time.monotonic() - started
    assert CLIENT_TIMEOUT - 0.1 < elapsed < CLIENT_TIMEOUT + SLACK, elapsed


@pytest.mark.parametrize("case", list(ANSWERED_EARLY))
def test_an_answered_body_sent_at_a_bodys_pace_is_read_and_the_connection_goes_on(case: str, clean: Setup) -> None:
    """64 KiB every 0.5 s, for longer than client_timeout in all: the pace holds, the body ends,
    and the same connection serves the next request."""
    length = 70_000 + 5 * 32_768  # under max_request_body (256 KiB)
    with _answered_early(clean.large.port, case, length) as sock:
        started = time.monotonic()
        for _ in range(5):
            time.sleep(0.25)
            sock.sendall(b"x" * 32_768)
        assert time.monotonic() - started > CLIENT_TIMEOUT
        sock.sendall(head("GET", "/echo"))
        assert _answer(sock) == 200


def test_a_connection_idle_after_an_answered_body_ended_gets_its_keep_alive_timeout(
    tmp_path: Path, clean: Setup
) -> None:
    """Before: once such a body had ended the connection had no timer at all (only an answer
    arms uvicorn's keep-alive timer, and that had come before the body's last bytes)."""
    config = fault_config(clean.upstream, clean.redis.url, client_keep_alive="1s", client_timeout="5s")
    with gateway_for(tmp_path, config) as proc, socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: not-a-key\r\nContent-Length: 100000\r\n\r\n"
                     + b"x" * 70_000)
        sock.settimeout(5)
        assert _answer(sock) == 401
        time.sleep(0.1)
        sock.sendall(b"x" * 30_000)  # the rest: the body has ended, the connection is idle
        started = time.monotonic()
        sock.settimeout(5)
        assert _drain(sock) == b""
        assert 0.9 < time.monotonic() - started < 1 + SLACK


# --- smuggling and malformed requests -----------------------------------------------------------

K = f"X-API-Key: {KEY}".encode()
TE = b"Transfer-Encoding: chunked"


def raw(start: bytes, *lines: bytes, body: bytes = b"") -> bytes:
    """A request head from raw lines (CRLF-terminated), then `body` as is."""
    return b"".join(line + b"\r\n" for line in (start + b" HTTP/1.1", b"Host: x", K, *lines)) + b"\r\n" + body


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n" + K + b"\r\n\r\n"
SMUGGLING = {
    "cl_and_te": raw(b"POST /a", b"Content-Length: 6", TE, body=b"0\r\n\r\n" + SMUGGLED),
    "te_and_cl": raw(b"POST /a", TE, b"Content-Length: 4",
                     body=b"5c\r\nGPOST /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n"),
    "two_lengths": raw(b"POST /a", b"Content-Length: 3", b"Content-Length: 40", body=b"abc" + SMUGGLED),
    "same_length_twice": raw(b"POST /a", b"Content-Length: 3", b"Content-Length: 3", body=b"abc"),
    "length_list": raw(b"POST /a", b"Content-Length: 3, 3", body=b"abc"),
    "length_plus_sign": raw(b"POST /a", b"Content-Length: +3", body=b"abc"),
    "length_negative": raw(b"POST /a", b"Content-Length: -1", body=b"abc"),
    "xchunked": raw(b"POST /a", b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
    "chunked_then_identity": raw(b"POST /a", b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
    "te_twice": raw(b"POST /a", TE, TE, body=b"0\r\n\r\n"),
    "space_before_colon": raw(b"POST /a", b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
    "te_obs_fold": raw(b"POST /a", b"Transfer-Encoding:\r\n chunked", body=b"0\r\n\r\n"),
    "obs_fold": raw(b"GET /a", b"X-Folded: a\r\n b"),
    "bare_lf_head": b"GET /a HTTP/1.1\nHost: x\n" + K + b"\n\n",
    "bare_lf_chunk_size": raw(b"POST /a", TE, body=b"3\nabc\r\n0\r\n\r\n"),
    "bare_lf_after_chunk": raw(b"POST /a", TE, body=b"3\r\nabc\n0\r\n\r\n"),
    "lf_in_chunk_extension": raw(b"POST /a", TE, body=b"3;a\nb\r\nabc\r\n0\r\n\r\n"),
    "bad_chunk_size": raw(b"POST /a", TE, body=b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk_size_overflow": raw(b"POST /a", TE, body=b"10000000000000003\r\nabc\r\n0\r\n\r\n"),
    "chunk_longer_than_its_size": raw(b"POST /a", TE, body=b"3\r\nabcdef\r\n0\r\n\r\n"),
    "bad_trailer": raw(b"POST /a", TE, body=b"3\r\nabc\r\n0\r\nX: a\nY\r\n\r\n"),
    "cr_in_header_value": raw(b"GET /a", b"X-Foo: a\rb"),
    "lf_in_header_value": raw(b"GET /a", b"X-Foo: a\nb"),
    "nul_in_header_value": raw(b"GET /a", b"X-Foo: a\x00b"),
    "control_char_in_name": raw(b"GET /a", b"X\x01Foo: a"),
    # HTTP/1.0 has no chunked coding: a front proxy reading the message as 1.0 sees no body, and
    # the chunk holding a request is that request to it (nginx refuses these too).
    "te_in_http_1_0": raw(b"POST /a", TE, body=b"5c\r\n" + SMUGGLED[:92] + b"\r\n0\r\n\r\n").replace(
        b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1),
    "te_and_cl_in_http_1_0": raw(b"POST /a", TE, b"Content-Length: 5", body=b"0\r\n\r\n").replace(
        b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1),
    "http_2_0_as_text": raw(b"GET /a").replace(b" HTTP/1.1\r\n", b" HTTP/2.0\r\n", 1),
}


@pytest.mark.parametrize("shape", list(SMUGGLING))
def test_smuggling_shapes_get_400_and_reach_nothing(shape: str, clean: Setup) -> None:
    calls = clean.evalsha()
    response, closed = exchange(clean.small.port, SMUGGLING[shape])
    assert status_of(response) == 400 and closed
    assert b'"success":false,"error":"bad_request"' in response  # the gateway's JSON, not uvicorn's text
    assert response.count(b"HTTP/1.1 ") == 1  # one answer: nothing parsed out of a body
    assert clean.upstream_total() == 0  # the upstream saw nothing, not even a truncated request
    assert clean.evalsha() == calls


def test_an_http_1_0_request_expecting_100_continue_gets_no_interim_answer(clean: Setup) -> None:
    """RFC 9110 §10.1.1: a server ignores 100-continue in an HTTP/1.0 request; an HTTP/1.0
    client would read `100 Continue` as its final answer. It sends its body at once and gets one
    answer; over HTTP/1.1 the interim answer still comes."""
    body = b"x" * 500  # (the module's gateway caps bodies at 1 KiB)
    request = (b"POST /a HTTP/1.0\r\n" + K.replace(KEY.encode(), ROOMY.encode())
               + b"\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n" + body)
    response, closed = exchange(clean.small.port, request)
    assert closed and status_of(response) == 200 and b"100 Continue" not in response
    assert response.count(b"HTTP/1.1 ") == 1
    assert upstream_stats(clean.upstream, "roomy")["last"]["body_length"] == len(body)
    with socket.create_connection(("127.0.0.1", clean.small.port)) as sock:
        sock.settimeout(5)
        sock.sendall(request.replace(b"HTTP/1.0", b"HTTP/1.1\r\nHost: x", 1)[:-len(body)])
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")


def test_pipelined_requests_reach_the_upstream_exactly_as_sent(clean: Setup) -> None:
    three = (head("POST", "/a", "Content-Length: 3") + b"abc"
             + head("POST", "/b", "Transfer-Encoding: chunked") + b"3\r\nxyz\r\n0\r\n\r\n"
             + head("GET", "/c", "Connection: close")).replace(KEY.encode(), ROOMY.encode())
    response, closed = exchange(clean.small.port, three)
    assert [status_of(b"HTTP/1.1 " + part) for part in response.split(b"HTTP/1.1 ")[1:]] == [200, 200, 200]
    assert closed
    stats = upstream_stats(clean.upstream, "roomy")
    assert stats["total"] == stats["completed"] == 3 and stats["last"]["path"] == "/c"


def test_a_client_leaving_with_requests_pipelined_behind_the_running_one_frees_it_quietly(clean: Setup) -> None:
    """uvicorn tells only its newest request cycle of a lost connection: with requests pipelined
    behind the one running, that one ended unanswered but not "disconnected", and uvicorn wrote
    it a 500 on the closed socket: a traceback in the log for every such client (the module's
    gateways fail on any traceback at exit). Now the running exchange is cut as any disconnect
    is: the upstream sees its client leave, the slot is free at once, the queued ones never run."""
    for attempt in range(5):
        with socket.create_connection(("127.0.0.1", clean.small.port)) as sock:
            sock.sendall(head("GET", "/hold?ms=10000") + head("GET", "/a") + head("GET", "/b"))
            deadline = time.monotonic() + 5
            while upstream_stats(clean.upstream, "hostile").get("in_flight") != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        stats = upstream_settled(clean)
        # the held one was cut (the upstream saw its client leave); only the normal ones completed
        assert (stats["in_flight"], stats["disconnects"], stats["completed"]) == (0, attempt + 1, attempt), stats
        assert get(clean.small, KEY).status_code == 200  # the one slot is free
    assert upstream_stats(clean.upstream, "hostile")["total"] == 10  # 5 held, 5 normal: none queued ran
