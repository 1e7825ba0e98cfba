"""The public proxy as one plain ASGI callable: the hot path.

Per request, in order: shutdown check → IP ban (403, from the local ban cache: no store call)
→ API key (401) → the usage path, if this is a GET of it (answered here: gateway/usage.py) →
route (404) → body cap by Content-Length (413) → the body, or its first 64 KiB, within
client_timeout (408 / 413) → its price (the route's cost rules) → one admission call (429 /
402 / 503) → stream the exchange, settling the charge when the upstream's headers arrive →
release (which carries the settlement). 401s, and 429s that came back before their told wait,
count as ban strikes, sent off the critical path (gateway/ban_guard.py).
Everything else (parsing, route compilation, bucket names, header blocks) was done at config
load. The slot is released exactly once, synchronously, in a `finally` whose `try` starts the
instant admission returns, however the request ends: completion, client disconnect, upstream
failure, cancellation, or an error of the gateway's own before the exchange. Whatever
the path, `_finish` counts the request and writes its one access-log line.
"""

from __future__ import annotations

from asyncio import CancelledError, Task, current_task
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter

from gateway.accesslog import AccessLog
from gateway.admission import waiting
from gateway.admission.bans import CONCURRENCY, RATE
from gateway.admission.controller import StoreUnavailable
from gateway.admission.headers import CONCURRENCY_RETRY_AFTER, refusal_message, retry_after_seconds
from gateway.admission.identity import IPAddress, client_ip, is_trusted, parse_ip
from gateway.asgi import Receive, Scope, Send
from gateway.ban_guard import DECIDING
from gateway.config.model import Key, Network
from gateway.metrics import NO_PLAN, NO_ROUTE
from gateway.plan_in_force import PlanInForce
from gateway.proxy.forwarder import ClientAborted, Outcome, forward
from gateway.proxy.headers import strip_query_param, upstream_request_headers, upstream_url
from gateway.proxy.request_body import BodyRefused, receive_body_start, request_framing
from gateway.proxy.settlement import RequestBill
from gateway.responses import send_error, send_json
from gateway.runtime import Routing
from gateway.state import GatewayState
from gateway.store.base import StoreError
from gateway.usage import UsageAnswers

Headers = list[tuple[bytes, bytes]]
_CLOSE = [(b"connection", b"close")]
# What a forwarder outcome means as a status (for the access log) and a metric code.
_OUTCOME_STATUS = {
    "timeout": 504, "error": 502, "disconnected": 499, "body_too_large": 413, "client_timeout": 408,
    "send_timeout": 408,
}
# Forwarder outcomes that say nothing about the upstream: not counted in upstream_responses.
_NOT_UPSTREAM = frozenset({"disconnected", "body_too_large", "client_timeout", "send_timeout"})
# An admitted exchange the gateway cut because the client stalled: the access log's `outcome`
# says so (both log 408) and gateway_client_timeouts_total counts it by stage.
_CLIENT_STALLS = {"client_timeout": "body", "send_timeout": "send"}


@dataclass(slots=True)
class _Done:
    """How one request ended: enough for the metrics and the access-log line."""

    status: int
    outcome: str  # the `outcome` label: admitted, rate_limited, unauthorized, ...
    key_id: str | None = None
    plan: str = NO_PLAN
    route: str = NO_ROUTE
    admission_s: float | None = None
    upstream_s: float | None = None
    upstream: Outcome | None = None
    client: IPAddress | None = None  # resolved client IP, when bans or trusted_proxies need it
    cut: bool = False  # unanswered when shutdown_grace ended: the access log says `shutting_down`


def _upstream_code(outcome: Outcome) -> str:
    """The `code` label: the status class, or the failure word."""
    return f"{outcome // 100}xx" if isinstance(outcome, int) else outcome


# `_upstream_code` of every status an upstream can send, made once (the failure words stay out:
# `_STATUS_CODES.get(outcome) or _upstream_code(outcome)`).
_STATUS_CODES = {status: _upstream_code(status) for status in range(100, 1000)}


def _cors_preflight(method: str, headers: Headers) -> bool:
    """A browser's CORS preflight: it never carries the key (the Fetch standard sends no
    credentials and none of the request's own headers with it), so its 401 is no key guessing
    and no ban strike. Checked only on the way to a 401."""
    if method != "OPTIONS":
        return False
    names = {name.lower() for name, _ in headers}
    return b"origin" in names and b"access-control-request-method" in names


def _from_trusted_proxy(peer: str | None, trusted: Sequence[Network]) -> bool:
    if not trusted or not peer:
        return False
    peer_ip = parse_ip(peer)
    return peer_ip is not None and is_trusted(peer_ip, trusted)


def _forwarded_for(peer: str | None, headers: Headers, trusted: Sequence[Network]) -> str:
    """The X-Forwarded-For chain sent upstream: a trusted proxy's chain is kept and the peer
    appended; from anyone else, only the peer."""
    if not _from_trusted_proxy(peer, trusted):
        return peer or ""
    chain = [value.decode("latin-1").strip() for name, value in headers if name == b"x-forwarded-for"]
    chain.append(peer or "")
    return ", ".join(part for part in chain if part)


class GatewayApp:
    def __init__(self, state: GatewayState, access_log: AccessLog | None = None) -> None:
        self.state = state
        self.access_log = access_log
        self.usage = UsageAnswers()
        # Every request begun and not yet ended, admitted or not (reading its body, waiting for a
        # slot): the drain waits for all of them, then `cut`s what is left.
        self.in_progress: dict[Task[object] | None, _Done] = {}
        self.cutting = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            started = perf_counter()
            done = _Done(500, "error")
            task = current_task()
            in_progress = self.in_progress
            in_progress[task] = done
            try:
                await self._http(scope, receive, send, done)
            except CancelledError as exc:
                if not self.cutting:
                    raise
                await self._cut(send, done, task, exc)
            finally:
                del in_progress[task]
                self._finish(scope, done, perf_counter() - started)
        elif scope["type"] == "lifespan":  # resources are owned by the server runner
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    def _finish(self, scope: Scope, done: _Done, elapsed: float) -> None:
        metrics = self.state.metrics
        metrics.requests_for[done.plan, done.route, done.outcome].inc()
        outcome = done.outcome
        if done.upstream is not None:
            code = _STATUS_CODES.get(done.upstream) or _upstream_code(done.upstream)
            if code not in _NOT_UPSTREAM:
                metrics.upstream_responses_for[done.route, code].inc()
            elif code in _CLIENT_STALLS:
                metrics.client_timeouts.labels(_CLIENT_STALLS[code]).inc()
                outcome = code
            metrics.request_duration_for[(done.route,)].observe(elapsed)
        if done.cut:
            outcome = "shutting_down"
            if done.outcome == "admitted":  # counted as admitted; its exchange ended on the gateway's side
                metrics.request_duration_for[(done.route,)].observe(elapsed)
        if self.access_log is not None:
            self.access_log.write(scope, done.status, outcome, done.key_id, done.plan, done.route,
                                  done.admission_s, done.upstream_s,
                                  client=None if done.client is None else str(done.client))

    def cut(self) -> int:
        """End every request still in progress (the drain's `shutdown_grace` is over); returns
        how many. Each is cancelled: its `finally`s free its slot or queue entry on the way out,
        and `_cut` answers it. Any later cancellation (uvicorn's, past its own timeout) is a cut too."""
        self.cutting = True
        for task in self.in_progress:
            if task is not None:
                task.cancel()
        return len(self.in_progress)

    async def _cut(self, send: Send, done: _Done, task: Task[object] | None, exc: CancelledError) -> None:
        """A request cut by the drain: a 503 `shutting_down` if its response had not started, else
        its connection dropped (a body cut short must never look complete). Never a 500 or a
        traceback: the gateway ended it, not a failure."""
        if task is not None:
            task.uncancel()  # handled here: the answer below must not look cancelled
        cycle = getattr(send, "__self__", None)  # uvicorn's request-response cycle, when it is one
        if getattr(cycle, "response_complete", False):
            return  # answered in full already
        done.cut = True
        if done.outcome != "admitted":  # an admitted request stays counted as admitted
            done.outcome = "shutting_down"
        if getattr(cycle, "response_started", False):
            # uvicorn closes the connection; the log filter drops its record (gateway/logs.py)
            done.status = getattr(exc, "response_status", done.status)  # the one the client has (the forwarder's)
            raise ClientAborted(done.status, "the gateway shut down")
        done.status = 503
        await send_error(send, 503, "shutting_down", "The gateway shut down before answering this request; retry.",
                         retry_after=1, extra_headers=_CLOSE)

    async def _http(self, scope: Scope, receive: Receive, send: Send, done: _Done) -> None:
        """Answer one request, recording in `done` how it ended."""
        state = self.state
        routing = state.routing  # one config for the whole request, even across a reload (but a wait's end)
        config = routing.config
        if state.draining:
            await send_error(send, 503, "shutting_down", "The gateway is shutting down; retry.",
                             retry_after=1, extra_headers=_CLOSE)
            done.status, done.outcome = 503, "shutting_down"
            return

        headers: Headers = scope["headers"]
        bans = config.bans
        trusted = config.identity.trusted_proxies
        socket_peer = scope.get("client")
        peer: str | None = socket_peer[0] if socket_peer else None  # the socket peer's address, as uvicorn gives it
        client = None
        if bans is not None or trusted:
            client = done.client = client_ip(peer, headers, trusted)
            banned_for = state.bans.retry_after(client, bans)
            if banned_for == DECIDING:  # it has strikes the store has not decided: wait for the verdict
                banned_for = await state.bans.verdict(client, bans)
            if banned_for is not None:
                await send_error(send, 403, "ip_banned", f"This IP address is banned for {banned_for} more "
                                 "seconds after too many refused requests.", retry_after=banned_for)
                done.status, done.outcome = 403, "ip_banned"
                return

        secret = routing.extractor.extract(headers, scope["query_string"])
        if secret is None:
            if not _cors_preflight(scope["method"], headers):
                state.bans.strike(client, bans)
            await send_error(send, 401, "missing_api_key", routing.missing_key_message)
            done.status, done.outcome = 401, "unauthorized"
            return
        key = routing.keys.lookup(secret)
        if key is None:
            state.bans.strike(client, bans)
            await send_error(send, 401, "invalid_api_key", "The API key is not valid.")
            done.status, done.outcome = 401, "unauthorized"
            return
        if client is not None:
            state.recent_clients.note(key.id, client)

        method: str = scope["method"]
        if scope["path"] == config.usage_path:  # the gateway's own path: never forwarded
            if method == "GET" or method == "HEAD":  # (the server sends a HEAD's head only)
                await self._usage(send, routing, key, done)
            else:
                await send_error(send, 405, "method_not_allowed", f"{config.usage_path} answers GET and HEAD only.",
                                 extra_headers=[(b"allow", b"GET, HEAD")])
                done.status, done.outcome, done.key_id, done.plan = 405, "no_route", key.id, key.plan
            return
        # The target before the route: a path refused as traversal (a dot segment, a control
        # byte, raw or encoded) is no route's, and is answered as what it is, not 404.
        query = scope["query_string"]
        if config.identity.api_key_query and query:
            query = strip_query_param(query, config.identity.api_key_query)
        url = upstream_url(config.upstream.url, scope.get("raw_path") or scope["path"].encode(), query)
        if url is None:
            await send_error(send, 400, "bad_request", "The request target cannot be forwarded.")
            done.status, done.outcome, done.key_id, done.plan = 400, "bad_request", key.id, key.plan
            return
        match = routing.routes.match(scope["path"], method)
        if match is None:
            await send_error(send, 404, "no_route", f"No route for {method} {scope['path']}.")
            done.status, done.outcome, done.key_id, done.plan = 404, "no_route", key.id, key.plan
            return
        index, route = match
        compiled = routing.plan_for(key, index, route)
        done.key_id, done.plan, done.route = key.id, key.plan, compiled.route_label

        framing = request_framing(headers)
        length = framing[0]
        if length is not None and length > config.max_request_body:
            await send_error(send, 413, "body_too_large",
                             f"The request body is larger than {config.max_request_body} bytes.", extra_headers=_CLOSE)
            done.status, done.outcome = 413, "body_too_large"
            return
        # The body (or its first 64 KiB) first: a slow client costs no store call and no slot.
        body_start = await receive_body_start(framing, receive, send, max_body=config.max_request_body,
                                              timeout=config.client_timeout)
        if isinstance(body_start, BodyRefused):
            done.status, done.outcome = body_start.status, body_start.outcome
            return

        plan = compiled.plan
        charge = plan.pricing.charge(method, scope["query_string"], headers)
        admission = state.admission
        started = perf_counter()
        in_force: PlanInForce | None = None
        try:
            ticket = await admission.admit(plan, charge)
            if ticket.waiting_in is not None:  # every slot busy: up to the plan's `wait` for one
                in_force = PlanInForce(state, routing, secret, scope["path"], method, key, compiled)
                ticket, receive = await waiting.wait(admission, plan, ticket, receive, in_force)
        except StoreUnavailable as exc:
            await send_error(send, 503, "store_unavailable", "Admission is unavailable right now; retry.",
                             retry_after=exc.retry_after)
            done.status, done.outcome = 503, "store_unavailable"
            return
        # From here the slot is released whatever happens (headers, metrics, the exchange):
        # nothing may stand between the admission's return and this `try`.
        try:
            if in_force is not None and in_force.routing is not routing:
                # Reloaded while it waited: it was decided under the new config, and goes on under it.
                routing, key, compiled = in_force.routing, in_force.key, in_force.compiled
                if compiled is None:  # the reload removed its key or its route: never admitted
                    await self._gone(send, done, key, scope["path"], method)
                    return
                plan, config = compiled.plan, routing.config
                done.key_id, done.plan, done.route = key.id, key.plan, compiled.route_label
                # (the query keeps the stripping of the config that found its key)
                url = upstream_url(config.upstream.url, scope.get("raw_path") or scope["path"].encode(), query)
            admitted_at = perf_counter()
            done.admission_s = admitted_at - started
            state.metrics.admission_duration.observe(done.admission_s)
            result = ticket.result
            if result is not None and not result.admitted:
                if isinstance(receive, waiting.WatchedReceive) and receive.disconnected:
                    # Its client left while it waited for a slot: nobody to answer, and leaving
                    # is no ban strike.
                    done.status, done.outcome = 499, "disconnected"
                    return
                # A refusal charges nothing, and says so.
                extra = [*compiled.limit_headers(result, charge), routing.cost_policy.header(0)]
                done.status = 429
                if result.reason == "quota":
                    # No ban strike: a client may rightly retry early after a grant or a reset.
                    done.status, done.outcome = plan.quota_status, "quota_exceeded"
                    await send_error(send, plan.quota_status, "quota_exceeded", refusal_message(plan, result, charge),
                                     retry_after=retry_after_seconds(result), extra_headers=extra)
                elif result.reason == "rate":
                    done.outcome = "rate_limited"
                    wait = retry_after_seconds(result)
                    state.bans.refused(client, bans, key.id, compiled.route_label, RATE, wait)
                    await send_error(send, 429, "rate_limited", refusal_message(plan, result, charge),
                                     retry_after=wait, extra_headers=extra)
                else:
                    done.outcome = "concurrency_limited"
                    state.bans.refused(client, bans, key.id, compiled.route_label, CONCURRENCY, None)
                    await send_error(send, 429, "concurrency_limited", refusal_message(plan, result, charge),
                                     retry_after=CONCURRENCY_RETRY_AFTER, extra_headers=extra)
                return

            bill: RequestBill | None = None
            if routing.cost_policy.flat:
                # The charge is the price whatever the upstream answers: its line is in the headers
                # already, and the ticket is never re-priced (`settled` stays None).
                extra = compiled.limit_headers.charged(result, charge)
            else:
                extra = compiled.limit_headers(result, charge) if result else []
                # From here the ticket is settled as an exchange with no answer until the upstream answers.
                bill = RequestBill(routing.cost_policy, charge.cost, ticket)
            upstream_headers = upstream_request_headers(
                routing.header_policy, headers, key_id=key.id, plan=key.plan,
                forwarded_for=_forwarded_for(peer, headers, trusted) if trusted else (peer or ""),
                forwarded_proto=scope.get("scheme", "http"), reflected=scope["method"] == "TRACE",
            )
            in_flight = state.metrics.in_flight_for[(key.plan,)]
            in_flight.inc()
            state.active_requests += 1
            done.outcome = "admitted"
            try:
                outcome = await forward(
                    scope, receive, send,
                    client=state.upstream,
                    url=url,
                    headers=upstream_headers,
                    extra_response_headers=extra,
                    max_body=config.max_request_body,
                    timeout=config.upstream.timeout,
                    body_start=body_start,
                    client_timeout=config.client_timeout,
                    observer=state.jobs.observer(routing.jobs, key.id, route, method, scope["path"], plan, ticket)
                    if routing.has_jobs else None,
                    on_complete=admission.release, on_complete_args=(plan, ticket),
                    complete_then_yield=state.store.release_turns,
                    bill=bill,
                    response_strip=routing.header_policy.response_strip,
                )
            except ClientAborted as exc:  # uvicorn drops the connection: a truncated body never looks complete
                done.status, done.upstream = exc.status, "aborted"
                raise
            finally:
                done.upstream_s = perf_counter() - admitted_at
                state.active_requests -= 1
                in_flight.dec()
                state.metrics.units_charged_for[key.plan, compiled.route_label].add(
                    charge.cost if bill is None else bill.settled)
            done.upstream = outcome
            done.status = outcome if isinstance(outcome, int) else _OUTCOME_STATUS[outcome]
            return
        finally:
            admission.release(plan, ticket)

    @staticmethod
    async def _gone(send: Send, done: _Done, key: Key | None, path: str, method: str) -> None:
        """A waiter whose key or route a reload removed: what a new request would get (no strike:
        the client did nothing wrong)."""
        if key is None:
            await send_error(send, 401, "invalid_api_key", "The API key is not valid.")
            done.status, done.outcome, done.key_id, done.plan, done.route = 401, "unauthorized", None, NO_PLAN, NO_ROUTE
        else:
            await send_error(send, 404, "no_route", f"No route for {method} {path}.")
            done.status, done.outcome, done.route = 404, "no_route", NO_ROUTE

    async def _usage(self, send: Send, routing: Routing, key: Key, done: _Done) -> None:
        """The usage path: the caller's own plan, limits and usage; never forwarded, never
        counted in a limit (gateway/usage.py)."""
        state = self.state
        done.key_id, done.plan, done.outcome = key.id, key.plan, "usage"
        store = state.jobs.primary
        try:
            if store is None:
                raise StoreError("no store reports usage")
            body = await self.usage.body(routing, key, store)
        except StoreError:
            done.status, done.outcome = 503, "store_unavailable"
            await send_error(send, 503, "store_unavailable", "Usage is unavailable right now; retry.", retry_after=1)
            return
        done.status = 200
        await send_json(send, 200, body, [(b"cache-control", b"no-store")])
