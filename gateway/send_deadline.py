"""A send deadline: a client that stops reading its response is cut after `client_timeout`.

uvicorn's `send()` waits, without a limit, for the transport's write buffer to drain once it is
full (`FlowControl`: the transport calls `pause_writing`), so a client that stops reading holds
its request task, its slot and its upstream connection for as long as it keeps the socket open.
This subclass arms a timer when writing pauses and cancels it when writing resumes: a write that
makes no progress for `client_timeout` aborts the connection (`abort`, not `close`: a buffer
nobody reads would never flush). The connection's `DisconnectWatch` is marked `send_stalled`
first, so the forwarder ends the exchange as `send_timeout`: upstream request cancelled, slot
released, the access log and `gateway_client_timeouts_total{stage="send"}` say why.

No cost on the hot path: the timer exists only while a client's socket buffer is full.
"""

from __future__ import annotations

import logging
from asyncio import TimerHandle

from gateway.header_deadline import HeaderDeadlineProtocol

log = logging.getLogger("gateway.client")


class SendDeadlineProtocol(HeaderDeadlineProtocol):
    _send_timer: TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.client_timeout(), self._send_deadline)

    def resume_writing(self) -> None:
        self._disarm_send()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_send()
        super().connection_lost(exc)

    def _disarm_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_deadline(self) -> None:
        self._send_timer = None
        if self.transport.is_closing():
            return
        log.debug("closing a connection to %s: the client read nothing for client_timeout",
                  self.client[0] if self.client else "?")
        self._disconnects.send_stalled = True
        self.transport.abort()
