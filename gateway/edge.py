"""The server protocol of both ports: uvicorn's httptools protocol with the gateway's guards.

In order of the class chain: disconnect notices without a task per request
(gateway/disconnects.py), request head limits (gateway/head_limits.py), a deadline for the
request head (gateway/header_deadline.py) and for a stalled response write
(gateway/send_deadline.py). `gateway serve` and the bare benchmark proxy both use it, so
benchmarks compare like with like.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.head_limits import HeadLimits, HeadLimitSettings
from gateway.send_deadline import SendDeadlineProtocol


def edge_protocol(
    client_timeout: Callable[[], float], head_limits: Callable[[], HeadLimitSettings] = HeadLimits
) -> type[SendDeadlineProtocol]:
    """The class for `uvicorn.Config(http=...)`. Both callables are read per request head (and
    `client_timeout` at each stall), so a config reload applies to the next request."""
    return type(
        "EdgeProtocol",
        (SendDeadlineProtocol,),
        {"client_timeout": staticmethod(client_timeout), "head_limits": staticmethod(head_limits)},
    )
