"""The alternative upstream client: httpx over HTTP/1.1, raw bytes, no cookies, no redirects.

Pooled connections close after `upstream.keep_alive` idle, and a request that fails before any
response byte on a reused connection is sent once more on a fresh one when its body is in hand
whole: the same keep-alive race defence as the aiohttp client (see its module docstring).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar
from typing import Any

import httpcore
import httpx

from gateway.config.model import Upstream
from gateway.proxy.upstream import (
    Body,
    Headers,
    UpstreamBodyError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)

# httpx logs every request with its full URL at INFO; the URL may carry secrets.
logging.getLogger("httpx").setLevel(logging.WARNING)


class _NoCookies(CookieJar):
    """The upstream's Set-Cookie headers belong to the gateway's clients, never to its pool."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


class _CancellationSafePool(httpcore.AsyncConnectionPool):
    """httpcore 1.0.9's pool, minus its cancellation leak (encode/httpcore#1093).

    The pool creates a connection for a queued request and hands it over; if that request is
    cancelled before it starts using the connection, the connection stays in the pool forever,
    neither connected, failed, idle nor available, and the pool fills up with them. Such an
    orphan has no socket and nobody waiting for it: drop it before every reassignment.
    """

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        claimed = {id(request.connection) for request in self._requests if request.connection is not None}
        self._connections = [
            connection
            for connection in self._connections
            if id(connection) in claimed or not _never_connected(connection)
        ]
        return super()._assign_requests_to_connections()

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        connection = super().create_connection(origin)
        if type(connection) is httpcore.AsyncHTTPConnection:
            connection.__class__ = _ReuseTrackingConnection  # same state, one method more
        return connection


# Whether the current request was given a connection that had served one before (set in the
# request's own task by `_ReuseTrackingConnection`, read by `send` when the request failed).
_reused: contextvars.ContextVar[bool] = contextvars.ContextVar("httpx_connection_reused", default=False)


class _ReuseTrackingConnection(httpcore.AsyncHTTPConnection):
    _served = False

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        _reused.set(self._served)
        self._served = True
        return await super().handle_async_request(request)


def _never_connected(connection: httpcore.AsyncConnectionInterface) -> bool:
    return (
        isinstance(connection, httpcore.AsyncHTTPConnection)
        and connection._connection is None
        and not connection._connect_failed
    )


def _transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(limits=limits, http1=True, http2=False, trust_env=False)
    pool = transport._pool
    if type(pool) is not httpcore.AsyncConnectionPool:
        raise RuntimeError(
            f"unexpected httpx transport pool {type(pool).__name__}: check the httpcore#1093 fix"
        )
    pool.__class__ = _CancellationSafePool  # same state, one method more careful
    return transport


class HttpxUpstreamClient:
    """`UpstreamClient` over one `httpx.AsyncClient`."""

    def __init__(self, upstream: Upstream) -> None:
        n = upstream.max_connections
        limits = httpx.Limits(
            max_connections=n, max_keepalive_connections=n, keepalive_expiry=upstream.keep_alive
        )
        self._client = self._new_client(upstream, limits)
        # Retries: a new connection each time, closed after its one request.
        self._fresh = self._new_client(upstream, httpx.Limits(max_keepalive_connections=0))
        self.retries = 0  # requests re-sent after a pooled connection failed (tests read it)

    @staticmethod
    def _new_client(upstream: Upstream, limits: httpx.Limits) -> httpx.AsyncClient:
        # Pool size and HTTP/1.1-only live on the transport; the client adds timeouts and policy.
        return httpx.AsyncClient(
            transport=_transport(limits),
            timeout=httpx.Timeout(
                connect=upstream.connect_timeout,
                read=upstream.timeout,
                write=upstream.timeout,
                pool=upstream.timeout,
            ),
            trust_env=False,
            follow_redirects=False,
            cookies=_NoCookies(),
        )

    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body,
        content_length: int | None,
    ) -> UpstreamResponse:
        if content_length is not None:
            headers = [*headers, (b"content-length", str(content_length).encode())]
        try:
            # A bare Request, not build_request(): the client's default headers (User-Agent,
            # Accept, Accept-Encoding, Connection) must not be added to what the client sent.
            request = httpx.Request(method, url, headers=headers, content=body)
            _reused.set(False)
            try:
                response = await self._client.send(request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                # Not a connect error: the request went out on a connection that then failed.
                if not _reused.get() or not (body is None or isinstance(body, bytes)):
                    raise
                self.retries += 1
                request = httpx.Request(method, url, headers=headers, content=body)
                response = await self._fresh.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            raise UpstreamUnavailable(f"connect timeout: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"no response: {exc!r}") from exc
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._fresh.aclose()


class _HttpxResponse:
    __slots__ = ("status", "headers", "length", "_response", "_raw")

    def __init__(self, response: httpx.Response) -> None:
        self.status: int = response.status_code
        self.headers: Headers = response.headers.raw
        declared = response.headers.get("content-length")
        self.length: int | None = int(declared) if declared is not None and declared.isdigit() else None
        self._response = response
        self._raw: AsyncIterator[bytes] | None = None

    def chunks(self) -> _HttpxResponse:
        return self

    def __aiter__(self) -> _HttpxResponse:
        return self

    async def __anext__(self) -> bytes:
        if self._raw is None:
            self._raw = self._response.aiter_raw()
        try:
            return await anext(self._raw)
        except (httpx.HTTPError, httpx.StreamError, OSError) as exc:
            raise UpstreamBodyError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        # Close the aiter_raw generator ourselves: left to the garbage collector, the loop would
        # finalise it in a task of its own. Then the response: an unread body closes the connection.
        raw, self._raw = self._raw, None
        try:
            if raw is not None:
                await raw.aclose()  # type: ignore[attr-defined]
        finally:
            await self._response.aclose()
