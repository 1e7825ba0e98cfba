"""What the request parser accepts: bounded heads, readable HTTP/1.1, no protocol switch.

uvicorn's httptools protocol accepts a request head of any size: httptools gathers a header
field by concatenating every fragment (a 40 MB header costs seconds of CPU, growing faster than
its size) and uvicorn keeps the target and every header. This subclass counts as bytes arrive,
before anything else sees them:

- the request target past `max_request_line` → 414 `uri_too_long`;
- the head (request line and header fields) past `max_request_headers`, or more than
  `max_request_header_count` fields → 431 `headers_too_large`; so does a chunked body's trailer
  section (or chunk framing: the bytes between two body bytes) past `max_request_headers`.
  Trailer fields are read and dropped, never merged into the request's headers;
- and what the parser cannot read at all, a version other than HTTP/1.1 and 1.0, or an HTTP/1.0
  request with a Transfer-Encoding → 400 `bad_request` (`NOT_HTTP`);
- an HTTP/1.1 request without a Host field, or any request with two of them or one that is no
  host → 400 `bad_request` (`BAD_HOST`), as RFC 9112 §3.2 requires and nginx does: a proxy in
  front may read another Host than the gateway's admin checks do;
- a request pipelined behind `MAX_PIPELINED` others still waiting for their answers → 503
  `too_many_pipelined`, after those answers. uvicorn queued every pipelined request with no
  bound and read on after each answer: one connection sending 13 MB of `GET / HTTP/1.1` in
  10 s held 725,000 queued requests and 1.1 GB, kept after it closed.

The gateway serves HTTP/1.1 only and never switches protocols (`Upgrade: websocket`, `h2c`):
uvicorn handed a WebSocket handshake to an app that has none (500) and, for any other upgrade,
left the bytes after the head unread. Here an upgrade request is served as the plain request it
also is (`Upgrade` is hop-by-hop: the upstream never sees it): its body, which the parser skips
for an upgrading request, is read by a parser of its own (gateway/declined_upgrades.py), and
the bytes after it are the next request. (`CONNECT` has no origin-form target: 400.)

An incomplete head is measured by the bytes received since it began, after each read (one read
is at most the event loop's buffer, 256 KiB), so the parser never holds more than the limit plus
one read; a complete one when it ends, by its target, its field count and its fields' size. The
answer carries the same JSON body as every other gateway error and closes the connection.
Nothing reaches the app: no key check, no store call. The limits are read at each check, so a
config reload applies to the next request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from typing import Protocol

import httptools

from gateway.declined_upgrades import body_framing, body_parser
from gateway.disconnects import DisconnectNotifyingProtocol
from gateway.responses import closing_error

log = logging.getLogger("gateway.client")


class HeadLimitSettings(Protocol):
    """What the protocol reads: `HeadLimits`, or the gateway's `Config` (same field names)."""

    @property
    def max_request_line(self) -> int: ...
    @property
    def max_request_headers(self) -> int: ...
    @property
    def max_request_header_count(self) -> int: ...


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """The defaults: in line with nginx (8 KiB request line, 32 KiB of headers) and Envoy
    (60 KiB of headers, 100 fields), a little roomier for long scraping targets."""

    max_request_line: int = 16 * 1024  # the target, in bytes
    max_request_headers: int = 64 * 1024  # request line and header fields, in bytes
    max_request_header_count: int = 100


HEADERS_TOO_LARGE = closing_error(431, "Request Header Fields Too Large", "headers_too_large",
                                  "The request headers are too large or too many.")
URI_TOO_LONG = closing_error(414, "URI Too Long", "uri_too_long", "The request target is too long.")
# What the parser cannot read (a bad request line, header or chunk, conflicting framing): the
# same JSON body as every other gateway error, where uvicorn would answer in plain text, log a
# warning per request (a hostile client's flood would flood the log) and write at once, even in
# the middle of a response to an earlier pipelined request.
NOT_HTTP = closing_error(400, "Bad Request", "bad_request", "The request is not valid HTTP/1.1.")
BAD_HOST = closing_error(400, "Bad Request", "bad_request",
                         "The request needs one Host header with a host name or address (and port) as its value.")
# What a Host value may hold (RFC 3986 host and port: reg-name, IPv4, IP-literal in brackets):
# the value is valid when deleting these leaves nothing. Not '/', '@', '\\', space or controls.
_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:[]"
_FIELD_NAME = itemgetter(0)


def host_field_valid(headers: list[tuple[bytes, bytes]], required: bool) -> bool:
    """One Host field with a host as its value, or none where none is `required` (HTTP/1.0).
    An empty value is valid (RFC 9110 §7.2: a target without an authority). All in C: the
    field names by `map`, counted and found by the list."""
    names = list(map(_FIELD_NAME, headers))
    count = names.count(b"host")
    if count != 1:
        return count == 0 and not required
    return not headers[names.index(b"host")][1].translate(None, _HOST_BYTES)
# Requests queued on one connection behind the one being served. Clients that pipeline send a
# few at a time; a deeper queue only holds memory, since they are answered one after another.
MAX_PIPELINED = 32
PIPELINE_FULL = closing_error(503, "Service Unavailable", "too_many_pipelined",
                              f"More than {MAX_PIPELINED} requests were sent ahead of their answers on one "
                              "connection; the rest were not read. Wait for answers, or use more connections.")


class _HeadRefused(Exception):
    """Raised inside a parser callback to stop httptools at once."""


class HeadLimitsProtocol(DisconnectNotifyingProtocol):
    """Set `head_limits` on a subclass (see gateway/edge.py).

    Cheap on the hot path: no parser callback is added. A complete head is checked once, when
    it ends (target length, field count, and its exact size only when more bytes than the limit
    arrived with it); an incomplete one after each read.
    """

    head_limits: Callable[[], HeadLimitSettings] = staticmethod(HeadLimits)

    url: bytes = b""  # uvicorn sets it when a message begins
    _head_open = True  # between the end of one message and the end of the next head
    _head_received = 0  # bytes read while the head was open (with any body bytes of that read)
    # Of those, the bytes of the read in which the previous message ended (a pipelined head began
    # somewhere in it, at an offset the parser does not tell): they make `_head_received` an upper
    # bound, which may call for the exact size at the head's end, but never prove an incomplete
    # head too large (they may be the previous message's body).
    _head_carried = 0
    _read_size = 0  # the read being parsed
    # Bytes read in a body since its last body byte: chunk framing, and at its end the trailer
    # section, which no other bound sees (the body cap counts body bytes only).
    _loose = 0
    _refusal: bytes | None = None
    _declined_with_body: bytes | None = None  # an upgrade request's body framing (`_should_upgrade`)
    # A refused connection's answer, written when its first bytes arrive (gateway/connection_limits.py)
    _refusal_awaits_data = False

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            if self._refusal_awaits_data:
                self._write_awaited_refusal()
            return
        self._read_size = size = len(data)
        if self._head_open:
            self._head_received += size
        else:
            self._loose += size
        self._unset_keepalive_if_required()
        parser = self.parser
        while True:
            try:
                parser.feed_data(data)
                break
            except httptools.HttpParserUpgrade as upgrade:
                # Not switched: the request was served as plain HTTP, and the parser stopped at
                # its head's end; what follows is its body, if it has one, then the next request.
                data = data[upgrade.args[0]:]
                framing = self._declined_with_body
                if framing is not None:
                    try:
                        parser = self._read_declined_body(framing)
                    except httptools.HttpParserError:  # framing no request may have
                        self._refuse(NOT_HTTP)
                        return
                if not data:
                    break
            except httptools.HttpParserError:
                # `_refusal` is set when on_headers_complete below stopped the parser
                self._refuse(self._refusal if self._refusal is not None else NOT_HTTP)
                return
        # A head still incomplete after this read (under 4 KiB there is nothing to bound yet: the
        # complete head is checked when it ends).
        if self._head_open and self._head_received > 4096:
            limits = self.head_limits()
            if len(self.url) > limits.max_request_line:
                self._refuse(URI_TOO_LONG)
            elif self._head_received - self._head_carried > limits.max_request_headers:
                self._refuse(HEADERS_TOO_LARGE)
        elif self._loose > 4096 and not self._head_open and self._loose > self.head_limits().max_request_headers:
            self._refuse(HEADERS_TOO_LARGE)  # a trailer section (or chunk framing) past the head's bound

    def on_headers_complete(self) -> None:
        limits = self.head_limits()
        if len(self.url) > limits.max_request_line:
            self._refusal = URI_TOO_LONG
        elif len(self.headers) > limits.max_request_header_count or (
            self._head_received > limits.max_request_headers and self._head_size() > limits.max_request_headers
        ):
            self._refusal = HEADERS_TOO_LARGE
        elif len(self.pipeline) >= MAX_PIPELINED:
            self._refusal = PIPELINE_FULL  # answered after the queued ones; nothing more is read
        elif (version := self.parser.get_http_version()) != "1.1" and not self._readable_http_1_0(version):
            self._refusal = NOT_HTTP
        elif not host_field_valid(self.headers, version == "1.1"):
            self._refusal = BAD_HOST
        if self._refusal is not None:
            raise _HeadRefused  # stops the parser: nothing reaches the app
        self._head_open = False
        self._head_received = 0  # (`_head_carried` matters only while a head is open: set when one opens)
        self._loose = 0
        super().on_headers_complete()
        # A chunked body's trailer fields reach uvicorn's `on_header` too, which appends them to
        # the list the request's scope holds: they would become request headers (forwarded, read
        # for the key) after every check of the head. Never merged (RFC 9110 §6.5.1): from here
        # on they go to a copy, which nothing reads as the request's headers.
        self.headers = self.headers.copy()

    def on_body(self, body: bytes) -> None:
        self._loose = 0  # body bytes: what came before them was framing
        super().on_body(body)

    def _readable_http_1_0(self, version: str) -> bool:
        """Whether a request that is not HTTP/1.1 is an HTTP/1.0 one the gateway serves. HTTP/1.0
        has no chunked coding: a Transfer-Encoding in it is faulty framing (RFC 9112 §6.1), a
        request-smuggling shape (a front proxy may take the chunks for the next request), refused
        as nginx refuses it. Nor has it 100-continue: the expectation is ignored (RFC 9110
        §10.1.1), since a `100 Continue` would read as its final answer. Any other version the
        parser lets through (`HTTP/2.0` written as text) is no HTTP/1 request at all."""
        if version != "1.0":
            return False
        if any(name == b"transfer-encoding" for name, _ in self.headers):
            return False
        self.expect_100_continue = False
        return True

    def on_message_complete(self) -> None:
        self._head_open = True
        # The next head may begin in this same read (pipelining): all of it counts as maybe its.
        self._head_received = self._head_carried = self._read_size
        super().on_message_complete()

    def _should_upgrade(self) -> bool:
        """Never (see the module's doc): uvicorn then serves the request as plain HTTP. It asks
        only when the parser saw an upgrade (at the head's end, again at the message's): a
        declared body, which the parser will skip, is noted for `_read_declined_body`."""
        self._declined_with_body = body_framing(self.headers)
        return False

    def _read_declined_body(self, framing: bytes) -> httptools.HttpRequestParser:
        """The parser, which ended the upgrade request just served at its head, ended its
        message too soon: undone, and its body read by a parser of its own from here on."""
        self._declined_with_body = None
        cycle = self.cycle  # the upgrade request's (a pipelined one's too: queued, not started)
        cycle.more_body = True
        cycle.message_event.clear()  # no task has run since: nobody saw the false end
        self._head_open = False  # a body is being read, not a head
        self.parser = parser = body_parser(self, framing)
        return parser

    def _head_size(self) -> int:
        """The head's size as parsed: its target and fields, each with its separators."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse(self, response: bytes) -> None:
        self._refusal = response  # from now on nothing more is read
        transport = self.transport
        if transport.is_closing():
            return
        # debug: a flood of oversized or unreadable heads must not flood the log as well
        log.debug("refusing a request from %s: %s", self.client[0] if self.client else "?",
                  response.split(b"\r\n", 1)[0].decode())
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not (self._head_open or cycle.response_started):
            # No response in progress; or the refused bytes are the current request's own (its
            # body) and its answer has not begun: the refusal is its answer.
            transport.write(response)
            transport.close()
        elif not self._head_open:
            transport.close()  # the current request's own bytes, mid-response: nothing fits in between
        else:
            # A head pipelined behind a response in progress: refused once the last response
            # before it is complete (the newest queued request's, else the current one's). Only
            # that cycle's callback changes: the hot path has no hook for this.
            last = self.pipeline[0][0] if self.pipeline else cycle
            last.on_response = self._refuse_after_response

    def _write_awaited_refusal(self) -> None:
        self._refusal_awaits_data = False
        transport = self.transport
        if not transport.is_closing() and self._refusal is not None:
            transport.write(self._refusal)
            transport.close()

    def _refuse_after_response(self) -> None:
        self.server_state.total_requests += 1  # as uvicorn's on_response_complete counts
        transport = self.transport
        if not transport.is_closing() and self._refusal is not None:
            transport.write(self._refusal)
            transport.close()
