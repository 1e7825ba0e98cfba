"""The seam between the forwarder and an HTTP client library.

Exceptions::

    UpstreamError                 anything the upstream exchange failed with
    ├── UpstreamUnavailable       refused, reset, invalid response, connect timeout  → 502
    ├── UpstreamTimeout           no response headers within upstream.timeout        → 504
    └── UpstreamBodyError         the response body broke after the headers arrived  → abort

Implementations map their library's exceptions onto these at the edge, so the forwarder never
imports aiohttp or httpx.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from gateway.config.model import Upstream

Headers = list[tuple[bytes, bytes]]
Body = bytes | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """The exchange with the upstream failed."""


class UpstreamUnavailable(UpstreamError):
    """Refused, reset, closed without an answer, an invalid answer, or a connect timeout."""


class UpstreamTimeout(UpstreamError):
    """No response headers within `upstream.timeout` (also: no free pooled connection in time)."""


class UpstreamBodyError(UpstreamError):
    """The response body failed after its headers were received (reset, truncated, stalled)."""


class UpstreamResponse(Protocol):
    """A response whose headers have arrived; its body is read with `chunks()`."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Headers:
        """The raw header list as received (original name case, duplicates kept)."""
        ...

    @property
    def length(self) -> int | None:
        """The body's length as its Content-Length declares it (None: not declared)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body bytes as they arrive, transfer framing removed, Content-Encoding untouched.

        Raises `UpstreamBodyError` when the body cannot be completed.
        """
        ...

    async def aclose(self) -> None:
        """Release the connection: back to the pool if the body was read to its end, else closed."""
        ...


class UpstreamClient(Protocol):
    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body,
        content_length: int | None,
    ) -> UpstreamResponse:
        """Send a request and wait for the response headers.

        `headers` carries no Host, Content-Length or Transfer-Encoding: the client frames the body,
        with `content_length` when known (else chunked). `body` is the whole body as bytes, an
        async iterator streamed as it yields, or None for no body. Cancelling the caller closes
        the upstream connection. Raises `UpstreamUnavailable` or `UpstreamTimeout`.
        """
        ...

    async def aclose(self) -> None: ...


def create_upstream_client(upstream: Upstream) -> UpstreamClient:
    """The client named by `upstream.client` (imported lazily: only one library is loaded)."""
    if upstream.client == "httpx":
        from gateway.proxy.httpx_client import HttpxUpstreamClient

        return HttpxUpstreamClient(upstream)
    if upstream.client == "aiohttp":
        from gateway.proxy.aiohttp_client import AiohttpUpstreamClient

        return AiohttpUpstreamClient(upstream)
    raise ValueError(f"unknown upstream client {upstream.client!r}")
