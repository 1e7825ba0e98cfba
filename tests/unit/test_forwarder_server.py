"""The forwarder behind a real uvicorn (httptools), seen from raw client sockets.

What only a real server shows: an aborted response really ends the connection without a clean
end of message, a closed client socket reaches the forwarder as `http.disconnect` (and the
upstream sees its connection closed), and `ClientAbortedLogFilter` silences the abort's log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.asgi import Receive, Scope, Send
from gateway.config.model import Upstream
from gateway.disconnects import DisconnectNotifyingProtocol
from gateway.proxy.forwarder import ClientAborted, ClientAbortedLogFilter, Outcome, forward
from gateway.proxy.headers import upstream_url
from gateway.proxy.upstream import UpstreamClient, create_upstream_client
from tests.support.mock_upstream import ThreadedMockUpstream

MAX_BODY = 1024 * 1024


class ProxyApp:
    """The smallest gateway: forward everything to the mock, record each outcome."""

    def __init__(self, upstream_url_base: str, kind: str) -> None:
        self.base = upstream_url_base
        self.kind = kind
        self.client: UpstreamClient | None = None
        self.outcomes: list[Outcome | str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.client = create_upstream_client(Upstream(url=self.base, client=self.kind))  # type: ignore[arg-type]
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.client is not None:
                        await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.client is not None
        url = upstream_url(self.base, scope["raw_path"], scope["query_string"])
        assert url is not None
        try:
            outcome = await forward(
                scope,
                receive,
                send,
                client=self.client,
                url=url,
                headers=[(b"x-gateway-key-id", b"k1")],
                extra_response_headers=[(b"x-ratelimit-limit", b"60")],
                max_body=MAX_BODY,
                timeout=5.0,
            )
        except ClientAborted as exc:
            self.outcomes.append(exc.outcome)
            raise
        self.outcomes.append(outcome)


class Gateway:
    def __init__(self, app: ProxyApp, protocol: str | type[asyncio.Protocol] = "httptools") -> None:
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                http=protocol,
                loop="asyncio",
                lifespan="on",
                log_config=None,  # uvicorn.error propagates to the root logger (and caplog)
                access_log=False,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock


@pytest.fixture(scope="module")
def mock() -> Iterator[ThreadedMockUpstream]:
    with ThreadedMockUpstream() as upstream:
        yield upstream


# uvicorn's own protocol (the forwarder watches receive() with a task) and the gateway's, which
# tells the forwarder of a disconnect itself (gateway/disconnects.py).
PROTOCOLS = {"uvicorn": "httptools", "gateway": DisconnectNotifyingProtocol}


@pytest.fixture(params=[(client, protocol) for client in ("aiohttp", "httpx") for protocol in PROTOCOLS],
                ids=lambda param: "-".join(param))
def gateway(request: pytest.FixtureRequest, mock: ThreadedMockUpstream) -> Iterator[Gateway]:
    mock.reset()
    client, protocol = request.param
    with Gateway(ProxyApp(mock.url, client), PROTOCOLS[protocol]) as server:
        yield server


def wait_for(check: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def key_stats(mock: ThreadedMockUpstream) -> dict[str, Any]:
    stats: dict[str, Any] = mock.snapshot()["keys"].get("k1", {})
    return stats


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def split_response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return lines[0], headers, body


def test_a_round_trip_through_uvicorn(gateway: Gateway) -> None:
    response = httpx.get(f"http://127.0.0.1:{gateway.port}/echo?a=1", headers={"x-trace": "t"})
    assert response.status_code == 200
    assert response.json()["query"] == "a=1"
    assert response.headers["x-ratelimit-limit"] == "60"
    wait_for(lambda: gateway.app.outcomes == [200])


def test_head_keeps_the_length_and_the_connection(gateway: Gateway) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{gateway.port}") as client:
        head = client.head("/download?bytes=5000")
        assert head.status_code == 200 and head.headers["content-length"] == "5000" and head.content == b""
        assert len(client.get("/download?bytes=5000").content) == 5000
    wait_for(lambda: gateway.app.outcomes == [200, 200])


@pytest.mark.parametrize("mode", ["length", "chunked"])
def test_upstream_breaking_mid_body_aborts_the_client_connection(gateway: Gateway, mode: str) -> None:
    with gateway.connect() as sock:
        sock.sendall(f"GET /abort_mid_body?mode={mode} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        raw = read_all(sock)  # returns at EOF: the gateway closed the connection
    status, headers, body = split_response(raw)
    assert status.startswith("HTTP/1.1 200")
    if mode == "length":
        assert headers["content-length"] == "1000"
        assert len(body) < 1000  # the client can tell the body is incomplete
    else:
        assert headers["transfer-encoding"] == "chunked"
        assert not body.endswith(b"0\r\n\r\n")  # no last-chunk: never a clean end
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"http://127.0.0.1:{gateway.port}/abort_mid_body?mode={mode}")
    wait_for(lambda: gateway.app.outcomes == ["aborted", "aborted"])


def test_client_aborted_log_filter_silences_only_the_abort(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    def crash_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "uvicorn.error" and r.exc_info]

    caplog.set_level(logging.ERROR, logger="uvicorn.error")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"http://127.0.0.1:{gateway.port}/abort_mid_body")
    wait_for(lambda: len(crash_records()) == 1)  # without the filter: logged as a crash
    log_filter = ClientAbortedLogFilter()
    logging.getLogger("uvicorn.error").addFilter(log_filter)
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://127.0.0.1:{gateway.port}/abort_mid_body")
        wait_for(lambda: gateway.app.outcomes == ["aborted", "aborted"])
        time.sleep(0.05)
        assert len(crash_records()) == 1
    finally:
        logging.getLogger("uvicorn.error").removeFilter(log_filter)


def test_the_log_filter_keeps_every_other_record() -> None:
    log_filter = ClientAbortedLogFilter()

    def record(exc: BaseException | None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "boom", None, exc_info)

    assert log_filter.filter(record(ClientAborted(200, "reset"))) is False
    assert log_filter.filter(record(RuntimeError("a real bug"))) is True
    assert log_filter.filter(record(None)) is True


def test_client_closing_while_headers_are_pending_closes_the_upstream(
    gateway: Gateway, mock: ThreadedMockUpstream
) -> None:
    sock = gateway.connect()
    sock.sendall(b"GET /delay_headers?ms=10000 HTTP/1.1\r\nHost: gw\r\n\r\n")
    wait_for(lambda: key_stats(mock).get("in_flight") == 1)
    sock.close()
    closed_at = time.monotonic()
    wait_for(lambda: key_stats(mock).get("disconnects") == 1)
    assert key_stats(mock)["disconnect_times"][0] - closed_at < 0.5
    wait_for(lambda: gateway.app.outcomes == ["disconnected"])


def test_client_closing_mid_download_closes_the_upstream(
    gateway: Gateway, mock: ThreadedMockUpstream
) -> None:
    sock = gateway.connect()
    sock.sendall(f"GET /download?bytes={100 * 64 * 1024}&ms=20 HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    received = 0
    while received < 64 * 1024:
        received += len(sock.recv(65536))
    sock.close()
    wait_for(lambda: key_stats(mock).get("disconnects") == 1)
    assert key_stats(mock)["completed"] == 0
    wait_for(lambda: gateway.app.outcomes == ["disconnected"])


def test_declared_body_over_the_cap_is_refused_before_the_upstream(
    gateway: Gateway, mock: ThreadedMockUpstream
) -> None:
    with gateway.connect() as sock:
        head = f"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: {MAX_BODY + 1}\r\n"
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n")
        status, headers, body = split_response(read_all(sock))
    assert status.startswith("HTTP/1.1 413")
    assert headers["content-type"] == "application/json"
    assert b'"error":"body_too_large"' in body
    assert key_stats(mock) == {}
    assert gateway.app.outcomes == ["body_too_large"]
