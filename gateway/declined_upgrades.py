"""Reading the body of a request whose protocol switch the gateway declined.

The gateway never switches protocols (gateway/head_limits.py). A request may still ask, with a
body: `curl --http2` sends `Upgrade: h2c` on a POST to an `http://` URL. HTTP lets a server
ignore `Upgrade` and answer the request as it is, body included; but the parser (llhttp) ends an
upgrading request at its head and stops there, leaving the body unread (forwarded with its
`Content-Length` and no body, the upstream waits for it; read as the next request, it would be
smuggled).

So the body is read by a fresh parser, primed with a head that has the request's own framing
headers (`Content-Length` or `Transfer-Encoding`, validated as for any request), whose events
for that head are dropped: its body events reach the request already in the app, and it parses
the connection's later requests as the first parser would have. Only such a connection pays the
extra call per parser event; everyone else runs the first parser untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httptools

_FRAMING = (b"content-length", b"transfer-encoding")


def body_framing(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The framing header lines of a request that declares a body (a Transfer-Encoding, or a
    Content-Length other than 0), as sent; None when it declares none."""
    framing = [(name, value) for name, value in headers if name in _FRAMING]
    if not any(name == b"transfer-encoding" or value.strip() != b"0" for name, value in framing):
        return None
    return b"".join(name + b": " + value + b"\r\n" for name, value in framing)


class _DropPrimingHead:
    """The parser's callbacks: the protocol's own, except for the priming head's."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._priming = True
        self.on_body = protocol.on_body
        self.on_message_complete = protocol.on_message_complete

    def on_message_begin(self) -> None:
        if not self._priming:
            self._protocol.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._priming:
            self._protocol.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._priming:
            self._protocol.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._priming:
            self._priming = False
        else:
            self._protocol.on_headers_complete()


def body_parser(protocol: Any, framing: bytes) -> httptools.HttpRequestParser:
    """A parser for the body that follows (framed by `framing`, from `body_framing`) and for the
    requests after it, reporting to `protocol` (raises httptools.HttpParserError when the framing
    is one no request may have)."""
    parser = httptools.HttpRequestParser(_DropPrimingHead(protocol))
    try:
        parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
    except AttributeError:  # an httptools without it (uvicorn tolerates that too)
        pass
    parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n")
    return parser
