"""Client disconnects told to the forwarder by the server protocol, without a task per request.

ASGI reports a disconnect only through `receive()`, so a proxy that must notice a client leaving
mid-response needs something awaiting `receive()` all along: a watcher task per request, which
costs as much CPU as several of the gateway's own steps together (creating, scheduling and
cancelling an asyncio task). The gateway's own server protocol knows of the disconnect first
(`connection_lost`), so it offers a `DisconnectWatch` in each request's scope
(`scope["extensions"]["gateway.disconnect"]`): the forwarder registers a callback there instead
of starting a task. Under any other server (tests driving the app directly, other ASGI servers)
the extension is absent and the forwarder falls back to its watcher task.
"""

from __future__ import annotations

from asyncio import Transport
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway import trusted_headers
from gateway.asgi import Scope

EXTENSION = "gateway.disconnect"


class DisconnectWatch:
    """The callbacks to run when one connection is lost (one per request in progress on it)."""

    __slots__ = ("_callbacks", "lost", "send_stalled")

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self.lost = False
        # True when the server closed the connection because the client stopped reading
        # (gateway/send_deadline.py): the exchange ends as `send_timeout`, not `disconnected`.
        self.send_stalled = False

    def add(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the connection is lost (at once if it already is)."""
        if self.lost:
            callback()
        else:
            self._callbacks.append(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        try:
            self._callbacks.remove(callback)
        except ValueError:
            pass

    def connection_lost(self) -> None:
        self.lost = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def disconnect_watch(scope: Scope) -> DisconnectWatch | None:
    """The connection's watch, when the server offers one."""
    extensions = scope.get("extensions")
    return extensions.get(EXTENSION) if extensions else None


class DisconnectNotifyingProtocol(trusted_headers.TrustedHeadersProtocol):
    """uvicorn's httptools protocol, offering each request a `DisconnectWatch` of its connection."""

    _disconnects: DisconnectWatch
    # Cycles that were unanswered when a request was pipelined behind them (the running one
    # among them): uvicorn tells a lost connection only to its newest cycle, `self.cycle`.
    _overtaken: list[RequestResponseCycle] | None = None

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        self._disconnects = DisconnectWatch()
        super().connection_made(transport)

    def on_headers_complete(self) -> None:
        previous = self.cycle
        # Before uvicorn creates the request's task, which gets this very scope.
        scope: Scope = self.scope  # type: ignore[assignment]  # (uvicorn types extension values as dicts)
        extensions = scope.get("extensions")
        if extensions is None:
            scope["extensions"] = {EXTENSION: self._disconnects, trusted_headers.EXTENSION: True}
        else:
            extensions[EXTENSION] = self._disconnects
            extensions[trusted_headers.EXTENSION] = True
        super().on_headers_complete()
        if self.pipeline and previous is not None and not previous.response_complete:  # queued behind it
            overtaken = [cycle for cycle in self._overtaken or () if not cycle.response_complete]
            overtaken.append(previous)
            self._overtaken = overtaken

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # uvicorn marks the cycle disconnected first, as receive() would
        # uvicorn marks only its newest cycle, which is a queued one when requests were pipelined
        # behind the running one: that one would end unanswered but not "disconnected" (uvicorn
        # would write it a 500 on the closed transport, a traceback per client), and a receive()
        # waiting in it (a waiter for a slot) would never hear the client leave.
        for cycle in self._overtaken or ():
            if not cycle.response_complete and not cycle.disconnected:
                cycle.disconnected = True
                cycle.message_event.set()
        self._disconnects.connection_lost()
