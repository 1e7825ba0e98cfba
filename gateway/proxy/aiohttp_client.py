"""The default upstream client: one long-lived aiohttp session, bytes passed through untouched."""

from __future__ import annotations

import asyncio

import aiohttp
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

KEEPALIVE_SECONDS = 30.0
# aiohttp adds these unless told not to; the upstream gets exactly what the client sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding")
# h11 (httpx) accepts 16 KiB of response headers; keep the two clients alike.
_MAX_FIELD_SIZE = 16 * 1024
_BODY_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class AiohttpUpstreamClient:
    """`UpstreamClient` over one `aiohttp.ClientSession`, created in the running loop on first use."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._session: aiohttp.ClientSession | None = None
        # connect=None: the forwarder's header deadline covers waiting for a pooled connection.
        # sock_read: a response body silent for `timeout` seconds is cut (UpstreamBodyError).
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=upstream.connect_timeout, sock_read=upstream.timeout
        )

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._upstream.max_connections,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_SECONDS,
            # getaddrinfo: honours /etc/hosts and the system resolver even when aiodns is installed.
            resolver=aiohttp.ThreadedResolver(),
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            raise_for_status=False,
            max_field_size=_MAX_FIELD_SIZE,
        )
        return self._session

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
        try:
            response = await session.request(
                method,
                URL(url, encoded=True),  # encoded: no re-quoting, no dot-segment resolution
                headers=str_headers,
                data=body,
                allow_redirects=False,
                compress=None,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamUnavailable(f"connect timeout: {exc}") from exc
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamTimeout(f"no response: {exc}") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _AiohttpResponse:
    """Its own async iterator: no generator object to finalise when abandoned mid-body."""

    __slots__ = ("status", "headers", "_response", "_content")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status: int = response.status
        self.headers: Headers = list(response.raw_headers)
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
