"""What `/readyz` answers: ready, degraded, store unavailable, or shutting down.

The store check runs the real admission script (a PING stays green through NOSCRIPT). When the
store fails it, or the circuit breaker is open, the gateway is *degraded*; what readiness says
then follows `store.on_error`, because readiness decides whether the replica gets traffic:

- `deny`: a degraded replica refuses every request with 503, so it is not ready (503).
- `local` / `allow`: a degraded replica still serves, by its local limits or without limits.
  Answering 503 would make the orchestrator pull every replica out at once when Redis dies,
  turning a store outage into a total outage, so it stays ready (200) and says `degraded`.
  Alerting watches `gateway_store_fallback_decisions_total` or the body.

`/readyz?strict` answers 503 whenever degraded, whatever the mode (for probes that want it).
Draining (SIGTERM) is always 503.

A passing store check closes the breaker (`Admission.store_answered`; Cluster: the breaker of
the probe keys' primary), as an admission's success would: so a replica the orchestrator pulled
comes back once the store answers, with no client traffic to probe it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.config.model import OnError
from gateway.store.base import StoreError

if TYPE_CHECKING:
    from gateway.state import GatewayState


@dataclass(frozen=True, slots=True)
class Readiness:
    status_code: int
    body: dict[str, object] = field(default_factory=dict)


def decide(
    *,
    draining: bool,
    store_failure: str | None,
    breaker_open: bool,
    on_error: OnError,
    strict: bool = False,
) -> Readiness:
    """The answer, from what was observed. `store_failure` names why the check failed (None: it passed)."""
    if draining:
        return Readiness(503, {"status": "shutting_down"})
    degraded = store_failure is not None or breaker_open
    body: dict[str, object] = {
        "store": "unavailable" if store_failure is not None else "ok",
        "breaker": "open" if breaker_open else "closed",
        "on_error": on_error,
    }
    if store_failure is not None:
        body["detail"] = store_failure
    if not degraded:
        return Readiness(200, {"status": "ready", **body})
    if strict or on_error == "deny":
        return Readiness(503, {"status": "store_unavailable", **body})
    return Readiness(200, {"status": "degraded", **body})


async def check_readiness(state: GatewayState, *, strict: bool = False) -> Readiness:
    """Run the store's readiness probe (bounded) and decide."""
    if state.draining:
        return decide(draining=True, store_failure=None, breaker_open=False,
                      on_error=state.admission.on_error)
    failure: str | None = None
    try:
        async with asyncio.timeout(max(0.5, 2 * state.routing.config.store.timeout)):
            await state.store.check_ready()
    except (StoreError, TimeoutError) as exc:
        failure = type(exc).__name__
    else:
        # The store answered the admission script: as good as an admission's success, so it
        # closes the breaker. A replica pulled from traffic for being degraded gets no request
        # that would, and would stay degraded after the store came back.
        state.admission.store_answered(state.store.ready_tag)
    return decide(
        draining=state.draining,
        store_failure=failure,
        breaker_open=state.admission.degraded,
        on_error=state.admission.on_error,
        strict=strict,
    )
