"""A receipt deadline for request headers, which uvicorn does not have (slowloris).

uvicorn's httptools protocol arms no timer on a fresh connection, and its keep-alive timer is
cancelled by the first byte of the next request: a client that sends a request head one byte
at a time holds its connection forever. This subclass gives every request head
`client_timeout` seconds, counted from the connection being accepted (first request) or from
the first byte of the request (keep-alive reuse), to arrive complete. Past it the connection is
closed, with a 408 when part of a request had arrived. The ASGI app only runs once the head is
complete, so a slow client never reaches admission: no store call, no slot.

The body has its own deadline in the app (gateway/proxy/request_body.py). The class builds on
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
from gateway.responses import error_body

log = logging.getLogger("gateway.client")

_BODY = error_body("request_timeout", "The request headers did not arrive in time.")
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY
)


class HeaderDeadlineProtocol(HeadLimitsProtocol):
    """Set `client_timeout` on a subclass (see gateway/edge.py)."""

    # Read at every arming, so a config reload applies to the next request head.
    client_timeout: Callable[[], float] = staticmethod(lambda: 30.0)

    _head_timer: TimerHandle | None = None
    _head_started = False

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A head left incomplete by this read gets its deadline now (on a fresh connection it
        # runs from the accept already). A head that arrived whole never needs a timer.
        if self._head_started and self._head_timer is None and not self.transport.is_closing():
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
        self.transport.close()

