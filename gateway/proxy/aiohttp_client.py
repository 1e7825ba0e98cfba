"""The default upstream client: one long-lived aiohttp session, bytes passed through untouched.

Pooled connections and the upstream's keep-alive race: an upstream closes an idle connection
after its own timeout (5 s for uvicorn and Node.js), and a request sent on it just then fails
before any response byte. Two defences: the pool closes idle connections after
`upstream.keep_alive` (4 s by default, below the upstream's), and a request that fails that way
on a *reused* connection is sent once more, on a fresh connection, when it can be re-sent whole
(no body, or a body the gateway holds as bytes; never a body streamed from the client). aiohttp's
own retry (idempotent methods only, possibly on another pooled connection) is turned off so that
a request is never sent more than twice.

Header values byte for byte: aiohttp takes headers as `str` and writes them as UTF-8, so a
client's byte 0xFF (decoded as latin-1 here) would reach the upstream as `c3 bf`.
`_install_latin1_headers` wraps aiohttp's header serialiser once per process: a head that comes
out pure ASCII (nearly all) is left as it is; otherwise it is written again as latin-1, the
client's own bytes. aiohttp's checks (no CR, LF or NUL) still run first.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from typing import Any

import aiohttp
import aiohttp.http_writer
from yarl import URL

from gateway.config.model import Upstream
from gateway.proxy.upstream import (
    Body,
    Headers,
    UpstreamBodyError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)
UNSOLICITED_LOG_EVERY = 60.0  # seconds between warnings about answers on idle connections

# aiohttp adds these unless told not to; the upstream gets exactly what the client sent.
# Headers aiohttp would add that the client did not send (httpx adds none of them): a body
# without `Content-Type` would reach the upstream as `application/octet-stream`.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# h11 (httpx) accepts 16 KiB of response headers; keep the two clients alike.
_MAX_FIELD_SIZE = 16 * 1024
_BODY_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
# A pooled connection the upstream closed: it fails before any response byte arrives.
_STALE_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)

# Whether the current request's connection came from the pool (set by `_ReuseTrackingConnector`
# in the request's own task, read by `send` when the request failed).
_reused: contextvars.ContextVar[bool] = contextvars.ContextVar("upstream_connection_reused", default=False)


class _ReuseTrackingConnector(aiohttp.TCPConnector):
    """Tells `send` whether a request got a pooled connection (one it has handed out before),
    and never hands out one on which the upstream spoke while it was idle.

    Bytes arriving on an idle connection are an answer nobody asked for: a late or extra
    response, an idle timeout's `408`. aiohttp parses and queues them, and the next request sent
    on that connection, another client's perhaps, would read them as its own response. Such a
    connection is closed and another one taken (Go's net/http does the same)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[object] = weakref.WeakSet()
        self.unsolicited = 0  # pooled connections dropped for what the upstream sent on them idle
        self._warned_at = -UNSOLICITED_LOG_EVERY

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        while True:
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            reused = protocol in self._handed_out
            if not reused or protocol is None or not protocol.should_close:
                break
            self.unsolicited += 1
            now = time.monotonic()
            if now - self._warned_at >= UNSOLICITED_LOG_EVERY:
                self._warned_at = now
                log.warning("the upstream sent a response on an idle connection (%d times so far): such "
                            "a connection is dropped, never given to the next request", self.unsolicited)
            connection.close()  # (each one closed: the pool runs out of them, then a new one comes)
        if not reused and protocol is not None:
            self._handed_out.add(protocol)
        _reused.set(reused)
        return connection


def _install_latin1_headers() -> None:
    original = aiohttp.http_writer._serialize_headers
    if getattr(original, "gateway_latin1", False):
        return

    def serialize(status_line: str, headers: Any) -> bytes:
        head: bytes = original(status_line, headers)  # validates, and is the fast C path
        if head.isascii():
            return head
        text = status_line + "".join(f"\r\n{name}: {value}" for name, value in headers.items()) + "\r\n\r\n"
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:  # a str beyond latin-1 never came from a client's bytes
            return head

    serialize.gateway_latin1 = True  # type: ignore[attr-defined]
    aiohttp.http_writer._serialize_headers = serialize


class AiohttpUpstreamClient:
    """`UpstreamClient` over one `aiohttp.ClientSession`, created in the running loop on first use."""

    def __init__(self, upstream: Upstream) -> None:
        _install_latin1_headers()
        self._upstream = upstream
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # retries: a new connection each time
        self.retries = 0  # requests re-sent after a pooled connection failed (tests read it)
        # connect=None: the forwarder's header deadline covers waiting for a pooled connection.
        # sock_read: a response body silent for `timeout` seconds is cut (UpstreamBodyError).
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=upstream.connect_timeout, sock_read=upstream.timeout
        )

    def _open(self) -> aiohttp.ClientSession:
        connector = _ReuseTrackingConnector(
            limit=self._upstream.max_connections,
            limit_per_host=0,
            keepalive_timeout=self._upstream.keep_alive,
            # getaddrinfo: honours /etc/hosts and the system resolver even when aiodns is installed.
            resolver=aiohttp.ThreadedResolver(),
            ttl_dns_cache=10,
        )
        self._session = self._new_session(connector)
        return self._session

    def _open_fresh(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            force_close=True, limit=0, resolver=aiohttp.ThreadedResolver(), ttl_dns_cache=10
        )
        self._fresh = self._new_session(connector)
        return self._fresh

    def _new_session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            raise_for_status=False,
            max_field_size=_MAX_FIELD_SIZE,
        )
        # aiohttp's own retry (idempotent methods, maybe on another pooled connection): ours
        # below replaces it, so that a request is sent at most twice.
        session._retry_connection = False
        return session

    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body,
        content_length: int | None,
    ) -> UpstreamResponse:
        session = self._session or self._open()
        str_headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        if content_length is not None:
            str_headers.append(("Content-Length", str(content_length)))
        target = URL(url, encoded=True)  # encoded: no re-quoting, no dot-segment resolution
        _reused.set(False)
        try:
            try:
                response = await _request(session, method, target, str_headers, body)
            except _STALE_ERRORS as exc:
                resendable = body is None or isinstance(body, bytes)  # not streamed from the client
                if isinstance(exc, _CONNECT_ERRORS) or not _reused.get() or not resendable:
                    raise
                # A pooled connection the upstream had closed: once more, on a fresh connection.
                self.retries += 1
                response = await _request(self._fresh or self._open_fresh(), method, target, str_headers, body)
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamUnavailable(f"connect timeout: {exc}") from exc
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamTimeout(f"no response: {exc}") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None


async def _request(
    session: aiohttp.ClientSession, method: str, url: URL, headers: list[tuple[str, str]], body: Body
) -> aiohttp.ClientResponse:
    return await session.request(
        method, url, headers=headers, data=body, allow_redirects=False, compress=None
    )


class _AiohttpResponse:
    """Its own async iterator: no generator object to finalise when abandoned mid-body."""

    __slots__ = ("status", "headers", "length", "_response", "_content")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status: int = response.status
        self.headers: Headers = list(response.raw_headers)
        self.length: int | None = response.content_length
        self._response = response
        self._content = response.content

    def chunks(self) -> _AiohttpResponse:
        return self

    def __aiter__(self) -> _AiohttpResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._content.readany()
        except _BODY_ERRORS as exc:
            raise UpstreamBodyError(f"{type(exc).__name__}: {exc}") from exc
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        # release() reuses the connection only when the body was read to its end; otherwise
        # aiohttp closes it, so the upstream sees an abandoned response as a closed connection.
        self._response.release()
