"""Stream one exchange between the ASGI client and the upstream, however it ends.

How the exchange is stopped: each phase (waiting for the response headers, then streaming the
response) runs inside its own `Phase` (gateway/proxy/phase.py: `asyncio.timeout`'s cancel scope,
cut down). Stopping the exchange, for a client disconnect or a request body over the cap, ends
the current phase now: the forwarding task is cancelled and the cancellation turns back into a
`TimeoutError` at the phase's end, with the same bookkeeping as a real deadline (a cancellation
of the caller itself still propagates). The client library sees a plain cancellation and closes
the upstream connection, so the upstream sees the close at once and no pooled connection is
left half-read.

Request body: what arrived before admission (`body_start`, see gateway/proxy/request_body.py),
or else the first `http.request` message, is in hand before the upstream is contacted. When it
is the whole body (every body-less request, and most small ones) the body goes upstream as
bytes with its length; otherwise it streams from `receive()` as it arrives, counted against the
cap, and a client that sends less than 64 KiB in `client_timeout` is cut (408 if the response
has not started). A client that stops reading the response is cut by the server protocol
(gateway/send_deadline.py), which reports it through the same watch as a disconnect.
Once the body is complete, a disconnect must still stop the exchange (uvicorn's `send()` silently
does nothing after one): the gateway's server protocol reports it through the scope
(gateway/disconnects.py); under any other server one watcher task waits on `receive()` for
`http.disconnect`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Literal, NoReturn, Protocol

from gateway import trusted_headers
from gateway.asgi import Receive, Scope, Send
from gateway.disconnects import DisconnectWatch, disconnect_watch
from gateway.proxy.headers import HOP_BY_HOP, NO_CONTENT, InvalidUpstreamHeaders, client_response_headers
from gateway.proxy.phase import Phase
from gateway.proxy.request_body import PREFETCH, BodyStart, declared_length, send_request_timeout
from gateway.proxy.settlement import RequestBill
from gateway.proxy.upstream import (
    Headers,
    UpstreamBodyError,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.responses import send_error
from gateway.trusted_headers import EncodedHeaders

Reason = Literal["disconnected", "body_too_large", "client_timeout", "send_timeout"]
Outcome = int | Literal[
    "timeout", "error", "disconnected", "body_too_large", "client_timeout", "send_timeout", "aborted"
]
# The client's connection is closed already: the exchange just ends.
_CLIENT_GONE: dict[Reason | None, Literal["disconnected", "send_timeout"]] = {
    "disconnected": "disconnected", "send_timeout": "send_timeout",
}
_ABORT_DETAIL = {
    "body_too_large": "the request body went over the cap",
    "client_timeout": "the client stopped sending its request body",
}


class ResponseObserver(Protocol):
    """Sees a response as it is relayed (async jobs read the JSON answer this way). Each call
    is awaited before the client gets what it is about, so the observer can act first.

    `outlives_client`: once the request has gone upstream, a client that leaves does not stop
    the exchange until the observer is `settled` (a job start: the upstream may start the job
    all the same, and a client that learns its id another way, a webhook or a job list, would
    have a job holding no slot); the rest of the answer goes nowhere."""

    outlives_client: bool

    @property
    def settled(self) -> bool:
        """Nothing more of the answer matters to the observer."""
        ...

    def upstream_headers(self, headers: Headers) -> Headers:
        """The request's headers as they go upstream (a job asks for an answer it can read)."""
        ...

    async def head(self, status: int, headers: Headers) -> bool:
        """Before the response starts; True to be shown the body."""
        ...

    async def chunk(self, data: bytes) -> None:
        """Before this body chunk is sent."""
        ...

    async def end(self) -> None:
        """The whole body was relayed; before the response is ended."""
        ...


class ClientAborted(Exception):
    """The response had started and cannot be completed: the server must drop the connection.

    Raised (never returned) so that uvicorn closes the connection instead of ending the body
    cleanly, which would make a truncated body look complete. For metrics the outcome is
    "aborted"; `status` is the upstream status that had been forwarded.
    """

    outcome: Literal["aborted"] = "aborted"

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"upstream response {status} broke off mid-body: {detail}")
        self.status = status


class ClientAbortedLogFilter(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" record for a `ClientAborted`.

    Install on the `uvicorn.error` logger: the abort is an expected upstream failure, already
    counted, not a crash.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ClientAborted))


class _Exchange:
    """What the forwarding task, the body iterator and the watcher share for one request."""

    __slots__ = ("task", "scope", "receive", "phase", "reason", "finished", "disconnects", "watcher", "observer",
                 "on_complete", "on_complete_args", "complete_then_yield", "bill", "response_strip",
                 "upstream_asked", "client_left")

    def __init__(self, task: asyncio.Task[object], scope: Scope, receive: Receive,
                 disconnects: DisconnectWatch | None) -> None:
        self.task = task
        self.scope = scope
        self.receive = receive
        self.phase: Phase | None = None
        self.reason: Reason | None = None
        self.finished = False
        self.disconnects = disconnects  # the server's own notice of a disconnect, when it offers one
        self.watcher: asyncio.Task[None] | None = None
        self.observer: ResponseObserver | None = None
        self.on_complete: Callable[..., None] | None = None
        self.on_complete_args: tuple[object, ...] = ()
        self.complete_then_yield = 0
        self.bill: RequestBill | None = None
        self.response_strip = HOP_BY_HOP
        self.upstream_asked = False  # the upstream request is on its way
        self.client_left: Reason | None = None  # gone while an observer reads on (`outlives_client`)

    def stop(self, reason: Reason) -> bool:
        """Record why the exchange must end and cancel the running phase, if any."""
        if self.reason is not None or self.finished:
            return False
        self.reason = reason
        phase = self.phase
        return phase is not None and phase.stop_now()

    def watch(self) -> None:
        """Stop the exchange if the client disconnects from now on (the body has been read)."""
        if self.disconnects is not None:
            self.disconnects.add(self._disconnected)  # no task: gateway/disconnects.py
        else:
            self.watcher = self.task.get_loop().create_task(self._watch())

    def _disconnected(self) -> None:
        disconnects = self.disconnects
        self.client_gone("send_timeout" if disconnects is not None and disconnects.send_stalled else "disconnected")

    async def _watch(self) -> None:
        while not self.finished:  # (a receive() that answers at once must not spin past the end)
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.client_gone("disconnected")
                return

    def client_gone(self, reason: Reason) -> None:
        """The client left: stop now, unless an observer that outlives the client still reads
        an answer already asked for (then `_relay` stops once it is settled)."""
        observer = self.observer
        if self.upstream_asked and observer is not None and observer.outlives_client and not observer.settled:
            self.client_left = reason
            return
        self.stop(reason)

    def finish(self) -> None:
        self.finished = True
        if self.watcher is not None:
            self.watcher.cancel()
        elif self.disconnects is not None:
            self.disconnects.discard(self._disconnected)


class _BodyAborted(Exception):
    """The body iterator could not cancel a phase: end the upload with an error instead."""


async def _stop_body(state: _Exchange, reason: Reason) -> NoReturn:
    if state.stop(reason):
        # The cancellation is on its way to the forwarding task (which may be this very task, for
        # httpx): send nothing more, the client library closes the connection mid-body.
        await asyncio.get_running_loop().create_future()
    raise _BodyAborted(reason)


async def _stream_body(
    first: bytes, state: _Exchange, max_body: int, idle: float | None
) -> AsyncIterator[bytes]:
    """The body after `first`. Progress means `PREFETCH` more bytes (or the end) within `idle`
    seconds, as for the body's start: a client trickling a byte now and then is cut as surely as
    a silent one (a 64 KiB step per 30 s is ~2 KiB/s, far below any real upload)."""
    receive = state.receive
    received = len(first)
    if first:
        yield first
    loop = asyncio.get_running_loop()
    deadline = None if idle is None else loop.time() + idle
    progress = 0
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            await _stop_body(state, "client_timeout")
        if message["type"] != "http.request":
            await _stop_body(state, "disconnected")
        chunk: bytes = message.get("body", b"")
        received += len(chunk)
        progress += len(chunk)
        if progress >= PREFETCH and idle is not None:
            progress = 0
            deadline = loop.time() + idle
        if received > max_body:
            # Never send the chunk that crosses the cap, nor the end of the body.
            await _stop_body(state, "body_too_large")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            break
    state.watch()


def _answering(extra: Headers, bill: RequestBill | None) -> Headers:
    """The headers of an answer the gateway makes itself instead of the upstream's: the limit
    headers and, when billed, the charge (as settled with no upstream answer)."""
    return extra if bill is None else list(bill.with_charge(extra))


async def _too_large(send: Send, max_body: int, extra: Headers) -> Literal["body_too_large"]:
    # Closing: the rest of an oversized body is not worth reading.
    await send_error(
        send, 413, "body_too_large", f"The request body exceeds {max_body} bytes.",
        extra_headers=[*extra, (b"connection", b"close")],
    )
    return "body_too_large"


async def forward(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    client: UpstreamClient,
    url: str,
    headers: Headers,
    extra_response_headers: Headers,
    max_body: int,
    timeout: float,
    body_start: BodyStart | None = None,
    client_timeout: float | None = None,
    observer: ResponseObserver | None = None,
    on_complete: Callable[..., None] | None = None,
    bill: RequestBill | None = None,
    on_complete_args: tuple[object, ...] = (),
    complete_then_yield: int = 0,
    response_strip: frozenset[bytes] = HOP_BY_HOP,
) -> Outcome:
    """Forward one admitted request and stream the answer back.

    `on_complete(*on_complete_args)` is called once the upstream's whole answer is in hand, just
    before the last (empty) body message goes to the client: the caller frees the slot there, so
    a client that sends its next request the moment this one ends never races its own release.
    (Its arguments ride apart so that the caller builds no `partial` per request.)
    `complete_then_yield`: `on_complete` queues a write (a shared store's release) that must be
    on its way before the client has the end, written this many loop iterations later: the loop
    turns that often.

    `body_start` is what was received before admission, if anything (its caller checked its
    `declared` Content-Length against `max_body` already); `client_timeout` bounds
    the time the client may take for each further 64 KiB of its body (None: no bound).
    `observer`, if given, sees the response as it is relayed (see `ResponseObserver`).
    `bill`, if given, is settled from the upstream's response headers (before `on_complete`),
    and every answer, the upstream's or the gateway's own, carries the charge header.
    `response_strip`: the upstream headers the client is not sent (`HeaderPolicy.response_strip`).
    Returns the upstream status, or "timeout" (504 sent), "error" (502 sent), "disconnected"
    (nothing more sent), "body_too_large" (413 sent, or the upstream request abandoned),
    "client_timeout" (408 sent, or the upstream request abandoned), "send_timeout" (the client
    stopped reading; the server closed its connection: gateway/send_deadline.py).
    Raises `ClientAborted` when the response broke off after it had started.
    """
    extra = extra_response_headers
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("forward() must run inside an asyncio task")
    if body_start is not None:  # its Content-Length was read, and checked against the cap, with it
        first, more_body, declared = body_start.data, not body_start.complete, body_start.declared
    else:
        declared = declared_length(scope["headers"])
        if declared is not None and declared > max_body:
            return await _too_large(send, max_body, _answering(extra, bill))
        try:
            with Phase(task, client_timeout):
                message = await receive()
        except TimeoutError:
            await send_request_timeout(send, _answering(extra, bill))
            return "client_timeout"
        if message["type"] != "http.request":
            return "disconnected"
        first, more_body = message.get("body", b""), message.get("more_body", False)
    if len(first) > max_body:
        return await _too_large(send, max_body, _answering(extra, bill))

    state = _Exchange(task, scope, receive, disconnect_watch(scope))
    state.observer = observer
    if observer is not None:  # job requests only: the hot path builds nothing more
        headers = observer.upstream_headers(headers)
    state.on_complete = on_complete
    state.on_complete_args = on_complete_args
    state.complete_then_yield = complete_then_yield
    state.response_strip = response_strip
    state.bill = bill
    body: bytes | AsyncIterator[bytes] | None
    if more_body:
        body = _stream_body(first, state, max_body, client_timeout)
        length = declared
    else:
        body = first or None
        length = declared if declared is not None else (len(first) if first else None)
        state.watch()
    try:
        if state.reason is not None:  # gone already (a server's watch tells at once): nothing goes upstream
            return "disconnected"
        return await _exchange(
            state, send, client, scope["method"], url, headers, body, length, extra, timeout, max_body
        )
    finally:
        state.finish()


async def _exchange(
    state: _Exchange,
    send: Send,
    client: UpstreamClient,
    method: str,
    url: str,
    headers: Headers,
    body: bytes | AsyncIterator[bytes] | None,
    length: int | None,
    extra: Headers,
    timeout: float,
    max_body: int,
) -> Outcome:
    response: UpstreamResponse | None = None
    try:
        with Phase(state.task, timeout) as phase:
            state.phase = phase
            state.upstream_asked = True
            response = await client.send(method, url, headers, body, length)
    except TimeoutError:
        if state.reason is None:
            await send_error(
                send, 504, "upstream_timeout", "The upstream did not answer in time.",
                extra_headers=_answering(extra, state.bill),
            )
            return "timeout"
    except UpstreamError as exc:
        if state.reason is None:
            if isinstance(exc, UpstreamTimeout):
                await send_error(
                    send, 504, "upstream_timeout", "The upstream did not answer in time.",
                    extra_headers=_answering(extra, state.bill),
                )
                return "timeout"
            return await _unavailable(send, _answering(extra, state.bill))
    except _BodyAborted:
        if state.reason is None:
            raise
    finally:
        state.phase = None

    if state.reason is not None or response is None:
        if response is not None:
            await response.aclose()
        if state.reason == "body_too_large":
            return await _too_large(send, max_body, _answering(extra, state.bill))
        if state.reason == "client_timeout":
            await send_request_timeout(send, _answering(extra, state.bill))
            return "client_timeout"
        return _CLIENT_GONE.get(state.reason, "disconnected")
    return await _relay(state, send, response, extra)


async def _complete(state: _Exchange, observer: ResponseObserver | None) -> None:
    """The upstream's whole answer is in hand and about to end for the client: the observer's
    end, then `on_complete` (the caller frees the slot), then, for a shared store, the loop
    iterations its release takes to be written (one; two on Redis Cluster), so that it is on its
    way before the client has the end. A client sending its next request at once, to another replica, never finds its
    own slot held."""
    if observer is not None:
        await observer.end()
    state.finished = True  # the end of the response wakes the watcher: not a disconnect
    if state.on_complete is not None:
        state.on_complete(*state.on_complete_args)
        turns = state.complete_then_yield
        while turns:
            await asyncio.sleep(0)
            turns -= 1


async def _unavailable(send: Send, extra: Headers) -> Literal["error"]:
    await send_error(send, 502, "upstream_unavailable", "The upstream is unavailable.", extra_headers=extra)
    return "error"


async def _relay(state: _Exchange, send: Send, response: UpstreamResponse, extra: Headers) -> Outcome:
    status = response.status
    try:
        try:
            out = client_response_headers(status, response.headers, state.response_strip)
        except InvalidUpstreamHeaders:
            return await _unavailable(send, _answering(extra, state.bill))
        if state.bill is not None:
            out = state.bill.answered(status, out)
            extra = state.bill.with_charge(extra)
        start = {"type": "http.response.start", "status": status, "headers": out}
        # The gateway's own headers, pre-encoded where the server allows. A block goes as it is
        # (an empty one adds nothing): its truth would count its lines, a Python `__len__` and a scan.
        if extra.__class__ is EncodedHeaders or extra:
            trusted_headers.add(start, extra, state.scope)
        with Phase(state.task, None) as phase:
            state.phase = phase
            observer = state.observer
            if observer is not None and not await observer.head(status, response.headers):
                observer = None
            if state.client_left is not None and (observer is None or observer.settled):
                return _CLIENT_GONE[state.client_left]  # read as far as it mattered
            if state.scope["method"] == "HEAD" or status in NO_CONTENT or response.length == 0:
                # No body: the head is the whole answer for the client, so the exchange
                # completes (its slot freed) before it is sent.
                await _complete(state, observer)
                left = None
            else:
                # A body of declared length is complete for the client with its last bytes, before
                # the closing message: the exchange completes (its slot freed) before they are sent.
                left = response.length
            await send(start)
            async for chunk in response.chunks():
                if observer is not None:
                    await observer.chunk(chunk)
                    if state.client_left is not None and observer.settled:
                        return _CLIENT_GONE[state.client_left]
                if left is not None:
                    left -= len(chunk)
                    if left <= 0 and state.reason is None:
                        left = None
                        await _complete(state, observer)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if state.reason is None:
                if not state.finished:
                    await _complete(state, observer)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
    except TimeoutError:
        if state.reason is None:
            raise
        if gone := _CLIENT_GONE.get(state.reason):  # nothing more can reach the client
            return gone
        raise ClientAborted(status, _ABORT_DETAIL[state.reason]) from None
    except UpstreamBodyError as exc:
        if gone := _CLIENT_GONE.get(state.reason):
            return gone
        raise ClientAborted(status, str(exc)) from exc
    except asyncio.CancelledError as exc:  # the task itself (the drain's cut): the app logs this status
        exc.response_status = status  # type: ignore[attr-defined]
        raise
    finally:
        state.phase = None
        await response.aclose()
    # A stop that landed after the last chunk, too late to cancel anything.
    if gone := _CLIENT_GONE.get(state.reason or state.client_left):
        return gone
    if state.reason is not None:
        raise ClientAborted(status, _ABORT_DETAIL[state.reason])
    return status
