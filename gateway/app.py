"""The public proxy as one plain ASGI callable: the hot path.

Per request, in order: shutdown check → client IP → API key (401) → route (404) → body cap by
Content-Length (413) → one admission call (429 / 503) → stream the exchange → release.
Everything else (parsing, route compilation, bucket names, header blocks) was done at config
load. The slot is released exactly once, synchronously, in a `finally`, however the
exchange ends: completion, client disconnect, upstream failure or cancellation.
"""

from __future__ import annotations

import time

from gateway.admission.controller import StoreUnavailable
from gateway.admission.headers import limit_headers, refusal_message, retry_after_seconds
from gateway.admission.identity import is_trusted, parse_ip
from gateway.asgi import Receive, Scope, Send
from gateway.metrics import NO_PLAN, NO_ROUTE
from gateway.proxy.forwarder import ClientAborted, forward
from gateway.proxy.headers import strip_query_param, upstream_request_headers, upstream_url
from gateway.responses import send_error
from gateway.state import GatewayState

_CLOSE = [(b"connection", b"close")]


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _forwarded_for(peer: str | None, headers: list[tuple[bytes, bytes]], trusted: bool) -> str:
    """The X-Forwarded-For chain to send upstream: a trusted proxy's chain is kept and the
    peer appended; from anyone else, only the peer."""
    if not trusted:
        return peer or ""
    chain = [value.decode("latin-1").strip() for name, value in headers if name == b"x-forwarded-for"]
    chain.append(peer or "")
    return ", ".join(part for part in chain if part)


class GatewayApp:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":  # resources are owned by the server runner
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        metrics = state.metrics
        routing = state.routing  # one config for the whole request, even across a reload
        config = routing.config
        if state.draining:
            metrics.requests.labels(NO_PLAN, NO_ROUTE, "shutting_down").inc()
            await send_error(send, 503, "shutting_down", "The gateway is shutting down; retry.",
                             retry_after=1, extra_headers=_CLOSE)
            return

        headers: list[tuple[bytes, bytes]] = scope["headers"]
        peer_addr = scope.get("client")
        peer = peer_addr[0] if peer_addr else None
        trusted = config.identity.trusted_proxies

        secret = routing.extractor.extract(headers, scope["query_string"])
        if secret is None:
            metrics.requests.labels(NO_PLAN, NO_ROUTE, "unauthorized").inc()
            await send_error(send, 401, "missing_api_key", routing.missing_key_message)
            return
        key = routing.keys.lookup(secret)
        if key is None:
            metrics.requests.labels(NO_PLAN, NO_ROUTE, "unauthorized").inc()
            await send_error(send, 401, "invalid_api_key", "The API key is not valid.")
            return

        method: str = scope["method"]
        match = routing.routes.match(scope["path"], method)
        if match is None:
            metrics.requests.labels(key.plan, NO_ROUTE, "no_route").inc()
            await send_error(send, 404, "no_route", f"No route for {method} {scope['path']}.")
            return
        index, route = match
        compiled = routing.plan_for(key, index, route)
        route_label = compiled.route_label

        length = _content_length(headers)
        if length is not None and length > config.max_request_body:
            metrics.requests.labels(key.plan, route_label, "body_too_large").inc()
            await send_error(send, 413, "body_too_large",
                             f"The request body is larger than {config.max_request_body} bytes.", extra_headers=_CLOSE)
            return

        query = scope["query_string"]
        if config.identity.api_key_query and query:
            query = strip_query_param(query, config.identity.api_key_query)
        url = upstream_url(config.upstream.url, scope.get("raw_path") or scope["path"].encode(), query)
        if url is None:
            metrics.requests.labels(key.plan, route_label, "bad_request").inc()
            await send_error(send, 400, "bad_request", "The request target cannot be forwarded.")
            return

        started = time.perf_counter()
        try:
            ticket = await state.admission.admit(compiled.plan)
        except StoreUnavailable as exc:
            metrics.requests.labels(key.plan, route_label, "store_unavailable").inc()
            await send_error(send, 503, "store_unavailable", "Admission is unavailable right now; retry.",
                             retry_after=exc.retry_after)
            return
        admitted_at = time.perf_counter()
        metrics.admission_duration.observe(admitted_at - started)
        result = ticket.result
        extra = limit_headers(compiled.plan, result, routing.families, compiled.policy) if result else []

        if result is not None and not result.admitted:
            if result.reason == "rate":
                metrics.requests.labels(key.plan, route_label, "rate_limited").inc()
                await send_error(send, 429, "rate_limited", refusal_message(compiled.plan, result),
                                 retry_after=retry_after_seconds(result), extra_headers=extra)
            else:
                metrics.requests.labels(key.plan, route_label, "concurrency_limited").inc()
                await send_error(send, 429, "concurrency_limited", refusal_message(compiled.plan, result),
                                 extra_headers=extra)
            return

        metrics.requests.labels(key.plan, route_label, "admitted").inc()
        peer_ip = parse_ip(peer) if peer else None
        from_proxy = bool(trusted) and peer_ip is not None and is_trusted(peer_ip, trusted)
        upstream_headers = upstream_request_headers(
            routing.header_policy, headers, key_id=key.id, plan=key.plan,
            forwarded_for=_forwarded_for(peer, headers, from_proxy),
            forwarded_proto=scope.get("scheme", "http"),
        )
        in_flight = metrics.in_flight.labels(key.plan)
        in_flight.inc()
        state.active_requests += 1
        outcome: int | str = "error"
        try:
            outcome = await forward(
                scope, receive, send,
                client=state.upstream,
                url=url,
                headers=upstream_headers,
                extra_response_headers=extra,
                max_body=config.max_request_body,
                timeout=config.upstream.timeout,
            )
        except ClientAborted as exc:
            outcome = exc.outcome  # the upstream broke mid-body; uvicorn closes the connection
            raise
        finally:
            state.admission.release(compiled.plan, ticket)
            state.active_requests -= 1
            in_flight.dec()
            metrics.request_duration.labels(route_label).observe(time.perf_counter() - admitted_at)
            code = f"{outcome // 100}xx" if isinstance(outcome, int) else outcome
            if code not in ("disconnected", "body_too_large"):
                metrics.upstream_responses.labels(route_label, code).inc()
