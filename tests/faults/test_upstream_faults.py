"""Upstream faults through a real gateway process on Redis: each gets its documented answer
(502 `upstream_unavailable`, 504 `upstream_timeout`, or an aborted response when the body broke
off) and the concurrency slot is free again at once, checked in Redis. A thousand cancelled
requests leave the upstream connection pool usable (httpcore #1093), with either client.

The forwarder's own tests (tests/unit/test_forwarder*.py) cover each fault in depth; these
prove the same through the whole process, where the slot lives in Redis."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.admission.identity import hash_key
from tests.faults.conftest import PREFIX, fault_config, gateway_for, get, upstream_stats
from tests.support.fault_proxy import FaultProxy, Mode
from tests.support.invariants import assert_no_leaks
from tests.support.load import metric
from tests.support.processes import Proc, mock_upstream
from tests.support.redis_server import SHARED_URL, shared_redis_reachable
from tests.support.secrets import secret

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

ONE_SLOT = secret("upstream-one-slot")


@pytest.fixture(scope="module")
def shared_db() -> Iterator[redis.Redis]:
    """The shared test Redis database (GATEWAY_TEST_REDIS_URL), flushed before and after."""
    if not shared_redis_reachable():
        pytest.skip(f"no Redis at {SHARED_URL}")
    client = redis.Redis.from_url(SHARED_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, shared_db: redis.Redis
) -> Iterator[tuple[Proc, str, FaultProxy]]:
    """One gateway whose upstream is the mock behind a fault proxy; key: one slot."""
    with mock_upstream() as upstream:
        port = int(upstream.rsplit(":", 1)[1])
        with FaultProxy(port) as proxy:
            proxied = f"http://127.0.0.1:{proxy.port}"
            config: dict[str, Any] = fault_config(proxied, SHARED_URL, on_error="deny")
            config["upstream"]["timeout"] = "500ms"
            config["keys"] = [{"id": "one", "sha256": hash_key(ONE_SLOT), "plan": "one"}]
            config["plans"] = {"one": {"limits": {"requests": {"concurrency": 1}}}}
            config["routes"] = [{"path": "/**", "limits": ["requests"]}]
            with gateway_for(tmp_path_factory.mktemp("upstream"), config) as gw:
                yield gw, upstream, proxy


def slot_sets_empty(client: redis.Redis) -> bool:
    return all(client.zcard(name) == 0 for name in client.scan_iter(match=f"{PREFIX}:*:c:*"))


UPSTREAM_FAULTS = {  # fault: (path, status, error)
    "refused": ("/", 502, "upstream_unavailable"),
    "reset_on_connect": ("/", 502, "upstream_unavailable"),
    "closed_without_answer": ("/close_immediately", 502, "upstream_unavailable"),
    "no_headers_in_time": ("/delay_headers?ms=3000", 504, "upstream_timeout"),
    "invalid_header_nul": ("/invalid_headers?kind=nul", 502, "upstream_unavailable"),
    "invalid_header_no_colon": ("/invalid_headers?kind=nocolon", 502, "upstream_unavailable"),
    "invalid_status_line": ("/invalid_headers?kind=status", 502, "upstream_unavailable"),
    # well-formed status lines the client cannot be sent: before, a KeyError in the server, a
    # traceback and an empty reply (600, 099), or a 101 with a chunked body after it
    "status_600": ("/invalid_headers?kind=status600", 502, "upstream_unavailable"),
    "status_099": ("/invalid_headers?kind=status099", 502, "upstream_unavailable"),
    "switching_protocols_unasked": ("/invalid_headers?kind=switching", 502, "upstream_unavailable"),
}


@pytest.mark.parametrize("fault", list(UPSTREAM_FAULTS))
def test_upstream_fault_answer_and_slot_freed(
    fault: str, setup: tuple[Proc, str, FaultProxy], shared_db: redis.Redis
) -> None:
    path, status, error = UPSTREAM_FAULTS[fault]
    gw, upstream, proxy = setup
    mode: Mode = "refuse" if fault == "refused" else "reset" if fault == "reset_on_connect" else "pass"
    proxy.set_mode(mode)
    try:
        started = time.monotonic()
        response = get(gw, ONE_SLOT, path)
        elapsed = time.monotonic() - started
    finally:
        proxy.set_mode("pass")
    assert response.status_code == status
    assert response.json()["error"] == error and "retry-after" not in response.headers
    assert response.headers["concurrency-limit"] == "1"
    assert elapsed < 0.5 + 0.5  # upstream.timeout bounds it, with slack
    # The one slot is free at once: in Redis, and for the next request.
    deadline = time.monotonic() + 1
    while not slot_sets_empty(shared_db):
        assert time.monotonic() < deadline, "the slot was not released"
        time.sleep(0.02)
    assert get(gw, ONE_SLOT).status_code == 200


def test_a_304_with_the_length_a_200_would_have_had_is_relayed_and_the_connection_goes_on(
    setup: tuple[Proc, str, FaultProxy], shared_db: redis.Redis
) -> None:
    """RFC 9110 §8.6 lets a 304 carry the Content-Length a 200 would have had. Relayed as it came,
    the server waited for those body bytes: a traceback, and a 500 in the access log for a 304
    the client had seen. It goes without its framing now, and the connection serves the next."""
    gw, _, _ = setup
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        request = f"GET {{}} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ONE_SLOT}\r\n\r\n"
        sock.sendall(request.format("/not_modified").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 304 ") and b'etag: "v1"' in head.lower(), head
        assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
        assert head.endswith(b"\r\n\r\n")  # nothing after the head
        sock.sendall(request.format("/").encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    deadline = time.monotonic() + 1
    while not slot_sets_empty(shared_db):
        assert time.monotonic() < deadline, "the slot was not released"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_upstream_closing_mid_body_aborts_the_client_response(
    mode: str, setup: tuple[Proc, str, FaultProxy], shared_db: redis.Redis
) -> None:
    """The client sees the response break off (never a complete one with half a body)."""
    gw, upstream, _ = setup
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        target = f"/abort_mid_body?mode={mode}"
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ONE_SLOT}\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if mode == "length":
        assert b"content-length: 1000" in head.lower() and len(body) < 1000
    else:
        assert b"transfer-encoding: chunked" in head.lower() and not body.endswith(b"0\r\n\r\n")
    with pytest.raises(httpx.RemoteProtocolError):  # what an HTTP client makes of it
        get(gw, ONE_SLOT, f"/abort_mid_body?mode={mode}")
    deadline = time.monotonic() + 1
    while not slot_sets_empty(shared_db):
        assert time.monotonic() < deadline, "the slot was not released"
        time.sleep(0.02)
    assert get(gw, ONE_SLOT).status_code == 200


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_a_thousand_cancelled_requests_leave_the_pool_usable(
    client: str, tmp_path: Path, shared_db: redis.Redis
) -> None:
    """1000 requests whose clients hang up while the upstream (or a pooled connection) is
    awaited, against a pool of 10 connections: afterwards every request is served at once."""
    key = secret("upstream-cancel")
    with mock_upstream() as upstream:
        config: dict[str, Any] = fault_config(upstream, SHARED_URL, on_error="deny")
        config["upstream"].update({"client": client, "max_connections": 10, "timeout": "5s"})
        config["keys"] = [{"id": "cancel", "sha256": hash_key(key), "plan": "p"}]
        config["plans"] = {"p": {"limits": {"requests": {"concurrency": 100}}}}
        config["routes"] = [{"path": "/**", "limits": ["requests"]}]
        def in_flight() -> int:
            return int(upstream_stats(upstream, "cancel").get("in_flight", 0))

        with gateway_for(tmp_path, config) as gw:
            request = f"GET /delay_headers?ms=5000 HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n".encode()
            started = time.monotonic()
            for _ in range(20):  # waves of 50
                sockets = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(50)]
                for sock in sockets:
                    sock.sendall(request)
                _wait(lambda: in_flight() == 10, "the pool filling")
                for sock in sockets:
                    sock.close()
                _wait(lambda: in_flight() == 0, "the upstream seeing closes")
            cancelled = time.monotonic() - started
            served = [get(gw, key, "/").status_code for _ in range(50)]
            timeouts = metric(gw.admin_url, "gateway_upstream_responses_total", code="timeout")
            _wait(lambda: slot_sets_empty(shared_db), "every slot released")
        stats = upstream_stats(upstream, "cancel")
    assert served == [200] * 50
    assert timeouts == 0
    # At least 10 per wave reached the upstream (the pool's size) and were cancelled there.
    assert 200 <= stats["disconnects"] == stats["total"] - 50
    print(f"\n[{client}] 1000 cancelled requests in {cancelled:.1f}s")
    assert_no_leaks(shared_db, PREFIX)


@pytest.mark.parametrize("kind", ["poison", "timeout"])
@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_an_answer_sent_on_an_idle_upstream_connection_never_reaches_the_next_client(
    client: str, kind: str, tmp_path: Path
) -> None:
    """The upstream answers one client, then on the now idle pooled connection sends another
    response nobody asked for (a late or extra answer; or an idle timeout's 408 before it
    closes). aiohttp queued it, and the next request on that connection, another client's,
    got it as its own answer. With one pooled connection, the next client must get its own."""
    one, other = secret("idle-one"), secret("idle-other")
    with mock_upstream() as upstream:
        config: dict[str, Any] = fault_config(upstream, "memory://", on_error="deny")
        config["upstream"].update({"client": client, "max_connections": 1})
        config["keys"] = [{"id": "one", "sha256": hash_key(one), "plan": "p"},
                          {"id": "other", "sha256": hash_key(other), "plan": "p"}]
        config["plans"] = {"p": {"limits": {"requests": {"concurrency": 10}}}}
        config["routes"] = [{"path": "/**", "limits": ["requests"]}]
        with gateway_for(tmp_path, config) as gw:
            answers = []
            for _ in range(3):
                first = get(gw, one, f"/extra_response?kind={kind}&ms=20")
                assert first.status_code == 200 and first.json() == {"first": True}
                time.sleep(0.3)  # the extra answer has arrived on the idle connection
                answers.append(get(gw, other, "/echo"))
            log = gw.log()
        stats = upstream_stats(upstream, "other")
    assert [answer.status_code for answer in answers] == [200] * 3
    assert all(answer.json().get("path") == "/echo" for answer in answers), [a.text for a in answers]
    assert stats["total"] == 3  # each one reached the upstream
    if client == "aiohttp" and kind == "poison":
        assert log.count("sent a response on an idle connection") == 1  # one warning a minute


def _wait(condition: Any, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {within}s"
        time.sleep(0.01)
