"""A receipt deadline for request headers, which uvicorn does not have (slowloris).

uvicorn's httptools protocol arms no timer on a fresh connection, and its keep-alive timer is
cancelled by the first byte of the next request: a client that sends a request head one byte
at a time holds its connection forever. This subclass gives every request head
`client_timeout` seconds, counted from the connection being accepted (first request) or from
the first byte of the request (keep-alive reuse), to arrive complete. Past it the connection is
closed, with a 408 when part of a request had arrived. The ASGI app only runs once the head is
complete, so a slow client never reaches admission: no store call, no slot.

The body has its own deadline in the app (gateway/proxy/request_body.py), while the app reads
it. A body the app never reads (the request was answered first: a 401, a 429, an upstream that
answered early) is read and thrown away by the server so that the connection can serve the next
request, and that had no deadline at all: uvicorn's keep-alive timer, armed when the answer
completes, is cancelled by the next bytes and never armed again, so a client trickling such a
body (or going silent once it ended) held its connection for ever. Here it keeps the pace a read
body must keep, each further `BODY_PACE` bytes within `client_timeout`, or the connection is
closed (the first `client_timeout` counted from the answer, so a client that sends no more of
it is cut then too); once it ends, the keep-alive timer runs as after any answer.

The class builds on
`HeadLimitsProtocol` (gateway/head_limits.py: bounded request heads) and so on
`DisconnectNotifyingProtocol` (gateway/disconnects.py), which tells the forwarder of a
disconnect without a task per request; gateway/edge.py assembles the protocol that `gateway
serve` and the bare benchmark proxy both use.
"""

from __future__ import annotations

import logging
from asyncio import TimerHandle, Transport
from collections.abc import Callable

from gateway.head_limits import HeadLimitsProtocol
from gateway.proxy.request_body import PREFETCH
from gateway.responses import error_body

log = logging.getLogger("gateway.client")

_BODY = error_body("request_timeout", "The request headers did not arrive in time.")
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY
)


BODY_PACE = PREFETCH  # bytes of an answered request's body that must arrive per client_timeout


class HeaderDeadlineProtocol(HeadLimitsProtocol):
    """Set `client_timeout` on a subclass (see gateway/edge.py)."""

    # Read at every arming, so a config reload applies to the next request head.
    client_timeout: Callable[[], float] = staticmethod(lambda: 30.0)

    _head_timer: TimerHandle | None = None  # the head's deadline, or an answered body's (`_discarding`)
    _head_started = False
    _discarding: object | None = None  # the cycle whose body arrives after its answer, thrown away
    _discarded = 0  # bytes of that body since its deadline was last armed

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._discarding is not None:
            self._discard(len(data))
        if self._head_timer is None:
            if self._head_started:
                # A head left incomplete by this read gets its deadline now (on a fresh connection
                # it runs from the accept already). A head that arrived whole never needs a timer.
                if not self.transport.is_closing():
                    self._arm()
                return
            cycle = self.cycle
            if cycle is None or not cycle.response_complete or self.transport.is_closing():
                return  # a request in progress: the app's deadlines hold
            if not self._head_open:
                # A body arriving after its request was answered: thrown away, at a body's pace.
                self._discarding = cycle
                self._discarded = 0
                self._arm()
            elif self.timeout_keep_alive_task is None and not self.pipeline:
                # Idle after such a body ended (each read cancels uvicorn's keep-alive timer, and
                # only an answer arms it): the keep-alive timer, as after any answer.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _discard(self, size: int) -> None:
        """The answered body took `size` more bytes: its deadline moves on every BODY_PACE bytes.
        Once it has ended, its deadline goes (the connection is idle, or reading the next head)."""
        if self.cycle is self._discarding and not self._head_open:
            self._discarded += size
            if self._discarded >= BODY_PACE:
                self._discarded = 0
                self._disarm()
                self._arm()
            return
        self._discarding = None
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._head_open and self._discarding is None and not self.transport.is_closing():
            # Answered before its body ended, and the client may send none of the rest: the
            # body's pace counts from the answer (uvicorn arms only its keep-alive timer here,
            # `client_keep_alive`, meant for an idle connection; the next read cancels it).
            self._discarding = self.cycle
            self._discarded = 0
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True

    def on_headers_complete(self) -> None:
        self._head_started = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.client_timeout(), self._head_deadline)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head waits behind a response still in progress: its time starts later.
            self._arm()
            return
        if self._head_started:
            # debug: a slowloris attack must not flood the log as well
            log.debug("closing a connection from %s: request headers incomplete after the deadline",
                      self.client[0] if self.client else "?")
            self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        elif self._discarding is not None:
            log.debug("closing a connection from %s: the body of a request already answered stalled",
                      self.client[0] if self.client else "?")
        self.transport.close()

