"""The server protocol of both ports: uvicorn's httptools protocol with the gateway's guards.

In order of the class chain: disconnect notices without a task per request
(gateway/disconnects.py), request head limits (gateway/head_limits.py), a deadline for the
request head (gateway/header_deadline.py) and for a stalled response write
(gateway/send_deadline.py); and here, the peer's address as the gateway writes it everywhere,
and the bounds on open connections (gateway/connection_limits.py), checked at the accept.
`gateway serve` and the bare benchmark proxy both use it, so benchmarks compare like with like.
"""

from __future__ import annotations

from asyncio import TimerHandle, Transport
from collections.abc import Callable

from gateway.connection_limits import REFUSAL_LINGER, REFUSALS, ConnectionGuard, OverLimit
from gateway.head_limits import HeadLimits, HeadLimitSettings
from gateway.send_deadline import SendDeadlineProtocol

_MAPPED = "::ffff:"


class EdgeProtocol(SendDeadlineProtocol):
    connection_guard: ConnectionGuard | None = None  # None: connections are not bounded (the bare proxy)
    _counted_as: str | None = None  # the client group this connection is counted under, while open
    _linger_timer: TimerHandle | None = None  # a refused connection's wait for its request

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`: the client is the IPv4
        # address, in X-Forwarded-For, the access log, bans and the admin API alike.
        client = self.client
        if client is not None and client[0].startswith(_MAPPED) and "." in client[0]:
            self.client = client = (client[0][len(_MAPPED):], client[1])
        guard = self.connection_guard
        if guard is not None:
            try:
                self._counted_as = guard.enter(client[0] if client is not None else None)
            except OverLimit as over:
                self._refuse_connection(guard, over.limit)

    def connection_lost(self, exc: Exception | None) -> None:
        guard = self.connection_guard
        if guard is not None:
            if self._counted_as is not None:
                guard.leave(self._counted_as)
                self._counted_as = None
            elif self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
                guard.lingered()
        super().connection_lost(exc)

    def _refuse_connection(self, guard: ConnectionGuard, limit: str) -> None:
        """Over a bound: the 503, written when the request arrives (or the linger ends), or at
        once when too many refused connections are waiting already."""
        self._refusal = REFUSALS[limit]  # nothing of this connection is ever parsed
        self._disarm()  # its head deadline: the linger is shorter
        guard.log_refusals(self.loop)
        if guard.may_linger():
            self._refusal_awaits_data = True
            self._linger_timer = self.loop.call_later(REFUSAL_LINGER, self._write_awaited_refusal)
        else:
            self._write_awaited_refusal()


def edge_protocol(
    client_timeout: Callable[[], float],
    head_limits: Callable[[], HeadLimitSettings] = HeadLimits,
    connection_guard: ConnectionGuard | None = None,
) -> type[EdgeProtocol]:
    """The class for `uvicorn.Config(http=...)`. Both callables are read per request head (and
    `client_timeout` at each stall), so a config reload applies to the next request; the guard,
    one per listening server, reads its limits per connection."""
    return type(
        "ConfiguredEdgeProtocol",
        (EdgeProtocol,),
        {"client_timeout": staticmethod(client_timeout), "head_limits": staticmethod(head_limits),
         "connection_guard": connection_guard},
    )
