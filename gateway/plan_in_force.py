"""A waiting request's plan under the config in force: the `replan` of gateway/admission/waiting.py.

A request takes one `Routing` at its start (gateway/runtime.py) and keeps it, except while it
waits for a slot: a reload then decides what it waits for, so that a raised limit admits it and
a lowered one holds it. Made only for a request that waits; asked at each of its checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.admission.buckets import AdmissionPlan
from gateway.config.model import Key
from gateway.runtime import CompiledPlan, Routing

if TYPE_CHECKING:
    from gateway.state import GatewayState


class PlanInForce:
    """Call it for the plan now (None: the reload removed the key or the route); `routing`,
    `key` and `compiled` are what the last call found."""

    __slots__ = ("_state", "_secret", "_path", "_method", "routing", "key", "compiled")

    def __init__(self, state: GatewayState, routing: Routing, secret: str, path: str, method: str,
                 key: Key, compiled: CompiledPlan) -> None:
        self._state = state
        self._secret = secret
        self._path = path
        self._method = method
        self.routing = routing
        self.key: Key | None = key
        self.compiled: CompiledPlan | None = compiled

    def __call__(self) -> AdmissionPlan | None:
        routing = self._state.routing
        if routing is not self.routing:  # reloaded since the last call
            self.routing = routing
            self.key = key = routing.keys.lookup(self._secret)
            match = None if key is None else routing.routes.match(self._path, self._method)
            self.compiled = None if key is None or match is None else routing.plan_for(key, *match)
        return None if self.compiled is None else self.compiled.plan
