"""The server protocol of both ports: uvicorn's httptools protocol with the gateway's guards.

In order of the class chain: disconnect notices without a task per request
(gateway/disconnects.py), request head limits (gateway/head_limits.py), a deadline for the
request head (gateway/header_deadline.py) and for a stalled response write
(gateway/send_deadline.py); and here, the peer's address as the gateway writes it everywhere.
`gateway serve` and the bare benchmark proxy both use it, so benchmarks compare like with like.
"""

from __future__ import annotations

from asyncio import Transport
from collections.abc import Callable

from gateway.head_limits import HeadLimits, HeadLimitSettings
from gateway.send_deadline import SendDeadlineProtocol

_MAPPED = "::ffff:"


class EdgeProtocol(SendDeadlineProtocol):
    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`: the client is the IPv4
        # address, in X-Forwarded-For, the access log, bans and the admin API alike.
        client = self.client
        if client is not None and client[0].startswith(_MAPPED) and "." in client[0]:
            self.client = (client[0][len(_MAPPED):], client[1])


def edge_protocol(
    client_timeout: Callable[[], float], head_limits: Callable[[], HeadLimitSettings] = HeadLimits
) -> type[EdgeProtocol]:
    """The class for `uvicorn.Config(http=...)`. Both callables are read per request head (and
    `client_timeout` at each stall), so a config reload applies to the next request."""
    return type(
        "ConfiguredEdgeProtocol",
        (EdgeProtocol,),
        {"client_timeout": staticmethod(client_timeout), "head_limits": staticmethod(head_limits)},
    )
