"""The limit headers' fast path (gateway/trusted_headers.py): the same bytes on the wire as
uvicorn's own checked path, and the checked path whenever the block is not provably plain."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway import trusted_headers
from gateway.asgi import Receive, Scope, Send
from gateway.disconnects import DisconnectNotifyingProtocol
from gateway.trusted_headers import MESSAGE_KEY, TrustedHeadersCycle, add, encode

LIMITS = [
    (b"concurrency-limit", b"10"), (b"concurrency-remaining", b"7"),
    (b"x-ratelimit-limit", b"100"), (b"x-ratelimit-remaining", b"42"), (b"x-ratelimit-reset", b"3"),
    (b"ratelimit-policy", b'"default";q=100;w=60, "slots";q=10;qu="concurrent-requests"'),
    (b"ratelimit", b'"default";r=42;t=3, "slots";r=7'),
]


def test_encode_is_the_lines_uvicorn_writes() -> None:
    assert encode(LIMITS) == b"".join(name + b": " + value + b"\r\n" for name, value in LIMITS)
    assert encode([(b"x-a", b"tab\tand \x80\xff high bytes")]) == b"x-a: tab\tand \x80\xff high bytes\r\n"


@pytest.mark.parametrize("headers", [
    [(b"content-length", b"3")],  # framing headers are uvicorn's to read
    [(b"x-a", b"1"), (b"transfer-encoding", b"chunked")],
    [(b"connection", b"close")],
    [(b"X-Upper", b"1")],  # uvicorn lowercases names
    [(b"x-a", b"1\r\nx-injected: 2")],  # one header must stay one line
    [(b"x-a", b"1\nx-b: 2")],
    [(b"x-a", b"nul\x00")],
    [(b"x-a", b"del\x7f")],
    [(b"bad name", b"1")],
    [(b"x-a:", b"1")],
    [(b"", b"1")],
])
def test_encode_refuses_what_uvicorn_must_check(headers: list[tuple[bytes, bytes]]) -> None:
    assert encode(headers) is None


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Flow:
    write_paused = False


def _cycle(kind: type[RequestResponseCycle], method: str = "GET", keep_alive: bool = True,
           http_version: str = "1.1") -> RequestResponseCycle:
    return kind(
        scope={"type": "http", "method": method, "http_version": http_version},  # type: ignore[arg-type]
        transport=_Transport(),  # type: ignore[arg-type]
        flow=_Flow(),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


def _state(cycle: RequestResponseCycle) -> tuple[Any, ...]:
    transport: Any = cycle.transport
    return (b"".join(transport.written), transport.closed, cycle.keep_alive, cycle.chunked_encoding,
            cycle.expected_content_length, cycle.response_started, cycle.response_complete)


async def _play(cycle: RequestResponseCycle, messages: list[dict[str, Any]]) -> tuple[Any, ...]:
    error = None
    for message in messages:
        try:
            await cycle.send(message)  # type: ignore[arg-type]
        except RuntimeError as exc:
            error = str(exc)
            break
    return (*_state(cycle), error)


def _start(status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(body: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": more}


EXCHANGES = {
    "content-length": ("GET", True, [_start(200, [(b"content-length", b"5")]), _body(b"ab", True), _body(b"cde")]),
    "chunked": ("GET", True, [_start(200, [(b"x-a", b"1")]), _body(b"ab", True), _body(b"")]),
    "head": ("HEAD", True, [_start(200, [(b"content-length", b"5")]), _body(b"")]),
    "no-content": ("GET", True, [_start(204, []), _body(b"")]),
    "connection-close": ("GET", True, [_start(200, [(b"Connection", b"Close"), (b"content-length", b"0")]), _body(b"")]),
    "http-1.0": ("GET", False, [_start(200, [(b"content-length", b"1")]), _body(b"x")]),
    "chunked-closing": ("GET", False, [_start(200, [(b"x-a", b"1")]), _body(b"ab", True), _body(b"")]),
    "too-long": ("GET", True, [_start(200, [(b"content-length", b"1")]), _body(b"xy")]),
    "too-short": ("GET", True, [_start(200, [(b"content-length", b"3")]), _body(b"xy")]),
    "bad-value": ("GET", True, [_start(200, [(b"x-a", b"a\nb")])]),
    "bad-name": ("GET", True, [_start(200, [(b"x a", b"1")])]),
    "body-first": ("GET", True, [_body(b"x")]),
    "after-end": ("GET", True, [_start(200, [(b"content-length", b"0")]), _body(b""), _body(b"")]),
}


@pytest.mark.parametrize("name", EXCHANGES)
def test_the_cycle_is_uvicorns_without_a_block(name: str) -> None:
    """TrustedHeadersCycle.send is a copy of uvicorn's: any drift shows here."""
    method, keep_alive, messages = EXCHANGES[name]
    theirs = asyncio.run(_play(_cycle(RequestResponseCycle, method, keep_alive), messages))
    ours = asyncio.run(_play(_cycle(TrustedHeadersCycle, method, keep_alive), messages))
    assert ours == theirs


@pytest.mark.parametrize("name", ["content-length", "chunked", "head", "connection-close", "http-1.0"])
def test_a_block_gives_the_bytes_of_the_same_headers_checked(name: str) -> None:
    method, keep_alive, messages = EXCHANGES[name]
    checked = [dict(messages[0], headers=[*messages[0]["headers"], *LIMITS]), *messages[1:]]
    block = encode(LIMITS)
    fast = [dict(messages[0], **{MESSAGE_KEY: block}), *messages[1:]]
    theirs = asyncio.run(_play(_cycle(RequestResponseCycle, method, keep_alive), checked))
    ours = asyncio.run(_play(_cycle(TrustedHeadersCycle, method, keep_alive), fast))
    assert ours == theirs
    assert b"x-ratelimit-remaining: 42\r\n" in ours[0]


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("keep_alive", [True, False])
def test_a_response_of_unknown_length_to_http_1_0_ends_with_the_close_not_chunked(method: str,
                                                                                  keep_alive: bool) -> None:
    """HTTP/1.0 has no chunked coding (RFC 9112 §6.1): uvicorn chunks such a response anyway,
    and an HTTP/1.0 client reads "2\r\nab\r\n0\r\n\r\n" as the body. Here the body goes as it
    is and the connection closes after it, which is what ends it for the client."""
    messages = [_start(200, [(b"x-a", b"1")]), _body(b"ab", True), _body(b"cd", True), _body(b"")]
    written, closed, still_alive, chunked, _, _, complete, error = asyncio.run(
        _play(_cycle(TrustedHeadersCycle, method, keep_alive, "1.0"), messages))
    assert error is None and complete and closed and not still_alive and not chunked
    assert written == b"HTTP/1.1 200 OK\r\nx-a: 1\r\nconnection: close\r\n\r\nabcd"
    theirs = asyncio.run(_play(_cycle(RequestResponseCycle, method, keep_alive, "1.0"), messages))
    assert b"transfer-encoding: chunked" in theirs[0]  # what uvicorn does (why this cycle differs)
    # With a length, or no body by its status or method, HTTP/1.0 gets what uvicorn writes.
    for same in ([_start(200, [(b"content-length", b"2")]), _body(b"ab")], [_start(204, []), _body(b"")]):
        assert asyncio.run(_play(_cycle(TrustedHeadersCycle, method, keep_alive, "1.0"), same)) == asyncio.run(
            _play(_cycle(RequestResponseCycle, method, keep_alive, "1.0"), same))
    head = [_start(200, [(b"x-a", b"1")]), _body(b"")]
    assert asyncio.run(_play(_cycle(TrustedHeadersCycle, "HEAD", keep_alive, "1.0"), head)) == asyncio.run(
        _play(_cycle(RequestResponseCycle, "HEAD", keep_alive, "1.0"), head))


def start_message(status: int, headers: list[tuple[bytes, bytes]], trusted: list[tuple[bytes, bytes]],
                  scope: Scope) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": headers}
    add(message, trusted, scope)
    return message


def test_add_takes_the_fast_path_only_where_the_server_offers_it() -> None:
    offered: Scope = {"type": "http", "extensions": {trusted_headers.EXTENSION: True}}
    message = start_message(200, [(b"content-length", b"0")], LIMITS, offered)
    assert message["headers"] == [(b"content-length", b"0")] and message[MESSAGE_KEY] == encode(LIMITS)

    for scope in ({"type": "http"}, {"type": "http", "extensions": {}}):
        message = start_message(200, [(b"content-length", b"0")], LIMITS, scope)  # type: ignore[arg-type]
        assert MESSAGE_KEY not in message and message["headers"] == [(b"content-length", b"0"), *LIMITS]

    refused = [(b"connection", b"close")]  # not provably plain: uvicorn checks and reads it
    message = start_message(200, [], refused, offered)
    assert MESSAGE_KEY not in message and message["headers"] == refused



class _App:
    """Answers with the limit headers through `start_message`; records what the server offered."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.seen.append((trusted_headers.supported(scope), type(getattr(send, "__self__", None)).__name__))
        await send(start_message(200, [(b"content-length", b"2")], LIMITS, scope))  # type: ignore[arg-type]
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


@pytest.fixture(params=["gateway", "uvicorn"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, _App, int]]:
    app = _App()
    protocol: Any = DisconnectNotifyingProtocol if request.param == "gateway" else "httptools"
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http=protocol, loop="asyncio",
                                           lifespan="off", log_config=None, access_log=False,
                                           server_header=False, date_header=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield request.param, app, int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)


def test_through_a_real_server_the_headers_arrive_either_way(served: tuple[str, _App, int]) -> None:
    kind, app, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(2):  # keep-alive: the second request gets a fresh cycle of the same kind
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\nok"):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            head = data.split(b"\r\n\r\n")[0]
            assert head == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + encode(LIMITS).rstrip(b"\r\n")  # type: ignore[union-attr]
    expected = (True, "TrustedHeadersCycle") if kind == "gateway" else (False, "RequestResponseCycle")
    assert app.seen == [expected, expected]
