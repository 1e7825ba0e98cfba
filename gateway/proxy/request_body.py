"""The start of the request body, received before admission, within `client_timeout`.

A request is admitted (one store call, maybe a slot) only once its body has arrived, or its
first `PREFETCH` bytes have: a client that sends its body slowly therefore costs no store call
and holds no slot while it dawdles, and a chunked body over `max_request_body` that fits in the
prefetch gets its 413 before anything reaches the store or the upstream. Beyond the prefetch
the body streams to the upstream (never buffered whole); the forwarder then cuts a client that
stays silent for `client_timeout` (gateway/proxy/forwarder.py).

One exception: a client that sent `Expect: 100-continue` waits for the gateway's go-ahead before
sending its body, so reading first would tell it to upload a body that a 429 then throws away.
Such a request is admitted first; its body then streams under the forwarder's idle deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.asgi import Receive, Send
from gateway.responses import send_error

# Bytes received before admission at most: about one uvicorn read buffer (its high-water mark).
PREFETCH = 64 * 1024


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~3x (object.__setattr__ per field)
class BodyStart:
    """What was received before admission: the whole body (`complete`) or its first bytes.
    Never changed once made."""

    data: bytes
    complete: bool
    declared: int | None = None  # the request's Content-Length (`declared_length`), read with the framing


@dataclass(frozen=True, slots=True)
class BodyRefused:
    """The request ended before admission; the answer (if any) has been sent."""

    status: int  # for the access log; 499 when the client went away
    outcome: str  # the `outcome` metric label


def declared_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length, or None when it has none (or one that is not a number)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# (Content-Length as `declared_length` reads it, declares a body, expects 100-continue)
Framing = tuple[int | None, bool, bool]
_UNFRAMED: Framing = (None, False, False)


def request_framing(headers: Sequence[tuple[bytes, bytes]]) -> Framing:
    """What the request's headers say of its body, in one pass over them: its Content-Length
    (as `declared_length` reads it), whether it has one (Content-Length or Transfer-Encoding;
    without either the parser has already ended the message, so the first `receive()` cannot
    wait), and whether the client waits for `100 Continue` before sending it."""
    names = dict(headers)  # built in C: most requests (a GET) have none of the three, and leave here
    if b"content-length" not in names and b"transfer-encoding" not in names and b"expect" not in names:
        return _UNFRAMED
    length = None
    expects_continue = framed = seen_length = False
    for name, value in headers:
        if name == b"content-length":
            framed = True
            if not seen_length:  # the first one counts, as in `declared_length`
                seen_length = True
                try:
                    length = int(value)
                except ValueError:
                    pass
        elif name == b"transfer-encoding":
            framed = True
        elif name == b"expect" and value.strip().lower() == b"100-continue":
            expects_continue = True
    return length, framed, expects_continue


async def receive_body_start(
    framing: Framing,
    receive: Receive,
    send: Send,
    *,
    max_body: int,
    timeout: float,
    prefetch: int = PREFETCH,
) -> BodyStart | BodyRefused | None:
    """Receive the body, or its first `prefetch` bytes, within `timeout` seconds; `framing` is
    `request_framing` of the request's headers.

    None: nothing was read (`Expect: 100-continue`); the forwarder reads the body.
    `BodyRefused`: 408 `request_timeout` or 413 `body_too_large` was sent, or the client left.
    """
    declared, framed, expects_continue = framing
    if expects_continue:
        return None
    if not framed:
        message = await receive()
        if message["type"] != "http.request":
            return BodyRefused(499, "disconnected")
        return BodyStart(message.get("body", b""), not message.get("more_body", False), declared)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return BodyRefused(499, "disconnected")
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > max_body:
                    await send_error(send, 413, "body_too_large",
                                     f"The request body is larger than {max_body} bytes.",
                                     extra_headers=[(b"connection", b"close")])
                    return BodyRefused(413, "body_too_large")
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return BodyStart(b"".join(chunks), True, declared)
                if size >= prefetch:
                    return BodyStart(b"".join(chunks), False, declared)
    except TimeoutError:
        await send_request_timeout(send)
        return BodyRefused(408, "client_timeout")


async def send_request_timeout(send: Send, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """408: the client stopped sending its request. The connection is closed after it."""
    await send_error(send, 408, "request_timeout", "The request body did not arrive in time.",
                     extra_headers=[*extra, (b"connection", b"close")])
