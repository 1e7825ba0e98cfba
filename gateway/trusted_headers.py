"""Response headers the gateway builds itself, written without uvicorn's per-header checks.

uvicorn's `send` checks every response header with two regular expressions, lowercases it and
compares it with three framing names before writing it: about 2,000 CPU instructions a header.
The limit headers (up to ten on every admitted response) are built by the gateway from numbers
and validated config names, so that work only repeats what is known. Here they are joined
into one pre-encoded block (`encode`), checked as a whole by one C-level match, and handed to
the server under `MESSAGE_KEY` in the `http.response.start` message; `TrustedHeadersCycle`
writes the block after the checked headers, where the same headers would have gone one by one.
The bytes on the wire are identical. That check costs ~16,000 instructions a response, so
headers that repeat in shape come as an `EncodedHeaders` block made from a template checked
once (an admitted request's limit headers: gateway/admission/header_block.py).

Only the gateway's own server protocol uses the cycle (`TrustedHeadersProtocol`, under
gateway/disconnects.py), and it says so in the scope (`supported`): under any other server the headers go the ordinary way. A block
that fails the check (a framing header, a name that is not a lowercase token, a control byte,
a value with a line break) also goes the ordinary way, so uvicorn decides exactly as before.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
    get_client_addr,
    get_path_with_query_string,
)

from gateway.asgi import Scope

EXTENSION = "gateway.trusted_headers"  # in scope["extensions"]: the server takes MESSAGE_KEY
MESSAGE_KEY = "gateway.trusted_headers"  # in http.response.start: the pre-encoded block

# Lines `name: value\r\n` that uvicorn would write unchanged and that do not frame the message:
# a lowercase token name (uvicorn lowercases names and reads these three itself), a value
# without the control bytes HEADER_VALUE_RE refuses.
_BLOCK = re.compile(
    rb"(?:(?!(?:content-length|transfer-encoding|connection):)[!#$%&'*+.^_`|~0-9a-z-]+: [\t\x20-\x7e\x80-\xff]*\r\n)*"
)


def supported(scope: Scope) -> bool:
    """Whether this request's server writes a trusted block (`TrustedHeadersCycle`)."""
    extensions = scope.get("extensions")
    return bool(extensions) and EXTENSION in extensions


def encode(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The headers as one block of `name: value\\r\\n` lines, or None when any of them must go
    through the server's own checks."""
    block = b"\r\n".join(map(b": ".join, headers)) + b"\r\n"
    # One line per header: a value with a line break must not pass as two valid headers.
    if block.count(b"\n") != len(headers) or _BLOCK.fullmatch(block) is None:
        return None
    return block


class EncodedHeaders(Sequence[tuple[bytes, bytes]]):
    """Headers made as one block that passes `encode`'s check (its maker checked the shape
    once, e.g. a template whose only varying parts are digits): `add` hands the block on
    without checking it again. As a sequence it gives the (name, value) pairs, for the paths
    that need them one by one (error answers, servers without the block)."""

    __slots__ = ("block",)

    def __init__(self, block: bytes) -> None:
        self.block = block

    def _pairs(self) -> list[tuple[bytes, bytes]]:
        return [(name, value) for name, _, value in (line.partition(b": ") for line in self.block.split(b"\r\n")[:-1])]

    def __len__(self) -> int:
        return self.block.count(b"\n")

    def __getitem__(self, index: Any) -> Any:
        return self._pairs()[index]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._pairs())

    def __repr__(self) -> str:
        return f"EncodedHeaders({self.block!r})"


def add(message: dict[str, Any], trusted: Sequence[tuple[bytes, bytes]], scope: Scope) -> None:
    """Add `trusted` to an `http.response.start` message, after its own headers: as a
    pre-encoded block when the server takes one, else appended to its `headers` list."""
    if not supported(scope):
        block = None
    elif isinstance(trusted, EncodedHeaders):
        block = trusted.block  # checked when its template was made
    else:
        block = encode(trusted)
    if block is None:
        message["headers"].extend(trusted)
    else:
        message[MESSAGE_KEY] = block


# `expected_content_length` of a body that ends when the connection closes (HTTP/1.0).
_UNTIL_CLOSE = -1


class TrustedHeadersCycle(RequestResponseCycle):
    """uvicorn's request-response cycle (as of uvicorn 0.55), whose `send` also writes the
    `MESSAGE_KEY` block of `http.response.start` after the headers it checks.

    The method is uvicorn's own, unchanged but for the block and one fix: a response of unknown
    length to an HTTP/1.0 request is delimited by closing the connection, as HTTP/1.0 has no
    chunked coding (RFC 9112 §6.1: a server must not send Transfer-Encoding to it); uvicorn
    chunks it, and the client takes the chunk framing for body bytes.
    tests/unit/test_trusted_headers.py compares its output and state with uvicorn's for the
    same messages, and the HTTP/1.0 case with what it must be."""

    async def send(self, message: Any) -> None:  # noqa: C901 (uvicorn's method, kept as it is)
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()

        if self.disconnected:
            return

        if not self.response_started:
            # Sending response status line and headers
            if message["type"] != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{message['type']}'.")

            self.response_started = True
            self.waiting_for_100_continue = False

            status_code = message["status"]
            headers = self.default_headers + list(message.get("headers", []))

            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status_code,
                )

            # Write response status line and headers
            content = [STATUS_LINE[status_code]]
            has_connection_close = False

            for name, value in headers:
                if HEADER_RE.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if HEADER_VALUE_RE.search(value):
                    raise RuntimeError("Invalid HTTP header value.")

                name = name.lower()
                if name == b"content-length" and self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
                elif name == b"connection":
                    connection = [token.lower().strip() for token in value.split(b",")]
                    if b"close" in connection:
                        self.keep_alive = False
                        has_connection_close = True
                content.extend([name, b": ", value, b"\r\n"])

            trusted = message.get(MESSAGE_KEY)  # the one addition: known valid, framing-free
            if trusted:
                content.append(trusted)

            if (self.chunked_encoding is None and self.scope["http_version"] == "1.0"
                    and self.scope["method"] != "HEAD" and status_code not in (204, 304)):
                # The fix: no length for an HTTP/1.0 client, so the close ends the body.
                self.chunked_encoding = False
                self.expected_content_length = _UNTIL_CLOSE
                self.keep_alive = False

            if not self.keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")

            if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status_code not in (204, 304):
                # Neither content-length nor transfer-encoding specified
                self.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")

            content.append(b"\r\n")
            self.transport.write(b"".join(content))

        elif not self.response_complete:
            # Sending response body
            if message["type"] != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{message['type']}'.")

            body = message.get("body", b"")
            more_body = message.get("more_body", False)

            # Write response body
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
            elif self.chunked_encoding:
                if body:
                    content = [b"%x\r\n" % len(body), body, b"\r\n"]
                else:
                    content = []
                if not more_body:
                    content.append(b"0\r\n\r\n")
                self.transport.write(b"".join(content))
            else:
                num_bytes = len(body)
                if self.expected_content_length == _UNTIL_CLOSE:
                    pass
                elif num_bytes > self.expected_content_length:
                    raise RuntimeError("Response content longer than Content-Length")
                else:
                    self.expected_content_length -= num_bytes
                self.transport.write(body)

            # Handle response completion
            if not more_body:
                if self.expected_content_length > 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()

        else:
            # Response already sent
            raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent, after response already completed.")


def _creating_trusted_cycles(method: Callable[..., None]) -> Callable[..., None]:
    """`method` of uvicorn's protocol, run as it is but creating a `TrustedHeadersCycle` where it
    creates a `RequestResponseCycle`: its own code, with that one global name rebound. (Turning
    a made cycle's class afterwards, `cycle.__class__ = ...`, was measured to cost every request
    ~27,000 instructions more, the bare proxy's too: it defeats CPython's attribute caches.)"""
    namespace = dict(method.__globals__, RequestResponseCycle=TrustedHeadersCycle)
    return types.FunctionType(method.__code__, namespace, method.__name__, method.__defaults__, method.__closure__)


class TrustedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose request cycles are `TrustedHeadersCycle`s. A subclass
    says so to the app by putting `EXTENSION` in each request's scope (gateway/disconnects.py
    does, in the extensions dict it adds anyway)."""

    on_headers_complete = _creating_trusted_cycles(HttpToolsProtocol.on_headers_complete)
