"""The one place that turns a refusal or failure into the SPEC §4 JSON answer.

Every response the gateway makes itself has `Content-Type: application/json` and the body
`{"success": false, "error": ..., "message": ..., "retryAfterSeconds": N}`, where
`retryAfterSeconds` appears exactly when the `Retry-After` header does, with the same value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from gateway.asgi import Send

Headers = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")


def error_body(error: str, message: str, retry_after: int | None = None) -> bytes:
    body: dict[str, object] = {"success": False, "error": error, "message": message}
    if retry_after is not None:
        body["retryAfterSeconds"] = retry_after
    return json.dumps(body, separators=(",", ":")).encode()


def closing_error(status: int, reason: str, error: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole error answer as raw HTTP/1.1 bytes that close the connection, for the server
    protocol's own refusals, written before (or without) any ASGI request."""
    body = error_body(error, message, retry_after)
    wait = b"" if retry_after is None else b"retry-after: %d\r\n" % retry_after
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n"
        % (status, reason.encode(), len(body), wait)
    ) + body


def error_headers(body: bytes, retry_after: int | None, extra: Sequence[tuple[bytes, bytes]] = ()) -> Headers:
    headers: Headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    headers.extend(extra)
    return headers


async def send_error(
    send: Send,
    status: int,
    error: str,
    message: str,
    *,
    retry_after: int | None = None,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete JSON error response (the response must not have started)."""
    body = error_body(error, message, retry_after)
    await send(
        {"type": "http.response.start", "status": status, "headers": error_headers(body, retry_after, extra_headers)}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, body: bytes, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON answer of the gateway's own (the usage path)."""
    headers: Headers = [_JSON, (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
