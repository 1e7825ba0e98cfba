"""The pure pieces of degraded operation, without processes: what readiness answers in each
state, the `local` divisor, and the reading of a request body's start under a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest

from gateway.admin.readiness import decide
from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.controller import Admission
from gateway.metrics import Metrics
from gateway.proxy.request_body import BodyRefused, BodyStart, receive_body_start, request_framing
from gateway.store.base import AdmitResult, RateBucket, SlotBucket, StoreError
from gateway.store.memory import MemoryStore

# -- readiness -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "failure", "breaker_open", "strict", "status", "word"),
    [
        ("local", None, False, False, 200, "ready"),
        ("deny", None, False, True, 200, "ready"),
        ("local", "TimeoutError", True, False, 200, "degraded"),
        ("allow", "StoreError", False, False, 200, "degraded"),
        ("local", None, True, False, 200, "degraded"),  # store back, breaker not yet closed
        ("deny", "StoreError", True, False, 503, "store_unavailable"),
        ("deny", None, True, False, 503, "store_unavailable"),
        ("local", "StoreError", True, True, 503, "store_unavailable"),
        ("allow", "StoreError", True, True, 503, "store_unavailable"),
    ],
)
def test_readiness_follows_on_error(
    mode: Any, failure: str | None, breaker_open: bool, strict: bool, status: int, word: str
) -> None:
    answer = decide(draining=False, store_failure=failure, breaker_open=breaker_open, on_error=mode,
                    strict=strict)
    assert (answer.status_code, answer.body["status"]) == (status, word)
    assert answer.body["on_error"] == mode
    assert answer.body["store"] == ("ok" if failure is None else "unavailable")
    assert answer.body["breaker"] == ("open" if breaker_open else "closed")
    assert ("detail" in answer.body) == (failure is not None)


@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
def test_draining_is_never_ready(mode: Any) -> None:
    answer = decide(draining=True, store_failure=None, breaker_open=False, on_error=mode)
    assert (answer.status_code, answer.body) == (503, {"status": "shutting_down"})


# -- the local divisor ---------------------------------------------------------------------------

PLAN = AdmissionPlan(
    "p",
    rates=(RateBucket("gw:{k:1}:r:rpm", 10, 60_000),),
    rate_info=(BucketInfo("rpm", 10, 60.0),),
    slots=(SlotBucket("gw:{k:1}:c:requests", 5),),
    slot_info=(BucketInfo("requests", 5, 0.0),),
    wait=0.0,
)


class DeadStore:
    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def admit(
        self, rates: Sequence[RateBucket], slots: Sequence[SlotBucket], lease_id: str, **_: object
    ) -> AdmitResult:
        raise StoreError("down")

    def release(self, slots: Sequence[SlotBucket], lease_id: str, **_: object) -> None:
        pass

    async def check_ready(self) -> None:
        raise StoreError("down")


@pytest.mark.parametrize(("divisor", "slots", "rate"), [(1, 5, 10), (2, 2, 5), (3, 1, 3), (20, 1, 1)])
def test_local_mode_divides_each_limit_never_below_one(divisor: int, slots: int, rate: int) -> None:
    """N replicas on their own during an outage admit at most N x max(1, limit // divisor)."""
    admission = Admission(DeadStore(), on_error="local", metrics=Metrics(), local=MemoryStore(30.0),
                          local_divisor=divisor)

    async def scenario() -> tuple[int, int]:
        held = [await admission.admit(PLAN) for _ in range(6)]
        concurrent = sum(ticket.admitted for ticket in held)
        for ticket in held:
            admission.release(PLAN, ticket)  # released under the plan's keys: slots free again
        admitted = concurrent
        for _ in range(12):  # one at a time: only the rate limit refuses now
            ticket = await admission.admit(PLAN)
            admitted += ticket.admitted
            admission.release(PLAN, ticket)
        return concurrent, admitted

    assert asyncio.run(scenario()) == (slots, rate)


# -- the body's start, before admission ----------------------------------------------------------


class Script:
    """An ASGI receive/send pair: `receive()` plays (delay, message) steps, `send()` records."""

    def __init__(self, steps: Sequence[tuple[float, dict[str, Any]]]) -> None:
        self.steps = list(steps)
        self.sent: list[MutableMapping[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self.steps:
            await asyncio.sleep(3600)
        delay, message = self.steps.pop(0)
        await asyncio.sleep(delay)
        return message

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return self.sent[0]["status"] if self.sent else None


def body(data: bytes, more: bool, delay: float = 0.0) -> tuple[float, dict[str, Any]]:
    return delay, {"type": "http.request", "body": data, "more_body": more}


CHUNKED = ((b"transfer-encoding", b"chunked"),)


def read(script: Script, headers: Sequence[tuple[bytes, bytes]] = CHUNKED, **kwargs: Any) -> Any:
    options = {"max_body": 1000, "timeout": 0.2, "prefetch": 100, **kwargs}
    return asyncio.run(receive_body_start(request_framing(headers), script.receive, script.send, **options))


def test_a_whole_small_body_is_read_before_admission() -> None:
    script = Script([body(b"ab", True), body(b"", True), body(b"cd", False)])
    assert read(script) == BodyStart(b"abcd", complete=True) and script.sent == []


def test_a_large_body_is_read_up_to_the_prefetch_then_streams() -> None:
    script = Script([body(b"x" * 60, True), body(b"y" * 60, True), body(b"z", False)])
    assert read(script) == BodyStart(b"x" * 60 + b"y" * 60, complete=False)
    assert len(script.steps) == 1  # the rest is the forwarder's to stream


def test_a_body_over_the_cap_inside_the_prefetch_gets_413() -> None:
    script = Script([body(b"x" * 80, True), body(b"x" * 80, False)])
    assert read(script, max_body=100, prefetch=1000) == BodyRefused(413, "body_too_large")
    assert script.status == 413


def test_a_silent_client_gets_408_at_the_deadline() -> None:
    script = Script([body(b"x", True), body(b"y", True, delay=0.5)])
    assert read(script) == BodyRefused(408, "client_timeout")
    assert script.status == 408
    assert (b"connection", b"close") in script.sent[0]["headers"]


def test_the_deadline_covers_the_whole_prefetch_not_each_chunk() -> None:
    """A byte every 80 ms never trips an idle timer of 200 ms, but the total does."""
    script = Script([body(b"x", True, delay=0.08) for _ in range(10)])
    assert read(script) == BodyRefused(408, "client_timeout")


def test_a_client_leaving_is_not_answered() -> None:
    script = Script([body(b"x", True), (0.0, {"type": "http.disconnect"})])
    assert read(script) == BodyRefused(499, "disconnected") and script.sent == []


def test_expect_100_continue_reads_nothing() -> None:
    script = Script([body(b"x", False)])
    assert read(script, headers=[*CHUNKED, (b"expect", b"100-continue")]) is None
    assert len(script.steps) == 1  # untouched: the go-ahead is only sent once admitted


def test_a_request_without_a_body_is_read_at_once() -> None:
    """No Content-Length, no Transfer-Encoding: the parser already ended the message."""
    script = Script([body(b"", False)])
    assert read(script, headers=[(b"accept", b"*/*")]) == BodyStart(b"", complete=True)
