"""What a request is finally charged (gateway/proxy/settlement.py), and the forwarder telling
it: the upstream's declared cost replaces the price when it is a plain integer (held to
MAX_COST), `success_only` settles non-2xx and unanswered exchanges to 0, the upstream's header
never reaches the client and the gateway's charge header is on every answer, its own included."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from gateway import trusted_headers
from gateway.config.model import Config, Upstream
from gateway.proxy.forwarder import forward
from gateway.proxy.settlement import CostPolicy, RequestBill, declared_cost
from gateway.proxy.upstream import Body, Headers, UpstreamUnavailable
from gateway.store.base import MAX_COST
from gateway.trusted_headers import EncodedHeaders


@pytest.mark.parametrize(("value", "cost"), [
    (b"7", 7), (b" 7 ", 7), (b"0", 0), (b"007", 7), (b"3, 9", 3), (str(MAX_COST).encode(), MAX_COST),
    (b"1001", MAX_COST), (b"99999999999999999999999", MAX_COST),
    (b"", None), (b"-1", None), (b"+2", None), (b"2.5", None), (b"abc", None), (b"\xd9\xa3", None), (b"1e3", None),
])
def test_declared_cost(value: bytes, cost: int | None) -> None:
    assert declared_cost(value) == cost


def policy(success_only: bool = False, header: str | None = "X-Upstream-Cost") -> CostPolicy:
    upstream = Upstream(url="http://u", cost_header=header, charge="success_only" if success_only else "always")
    return CostPolicy.from_config(Config(upstream=upstream, keys=(), plans={}, routes=()))  # type: ignore[call-arg]


def test_the_declared_cost_replaces_the_price_and_its_header_goes() -> None:
    settled, headers = policy().settle(5, 200, [(b"X-Upstream-Cost", b"2"), (b"a", b"1"), (b"x-upstream-cost", b"9")])
    assert settled == 2 and headers == [(b"a", b"1")]  # the first value counts; every copy is removed
    assert policy().settle(5, 200, [(b"X-Upstream-Cost", b"nope")]) == (5, [])
    assert policy(header=None).settle(5, 200, [(b"X-Upstream-Cost", b"2")]) == (5, [(b"X-Upstream-Cost", b"2")])


def test_success_only_settles_non_2xx_to_zero() -> None:
    assert policy(True).settle(5, 500, [(b"x-upstream-cost", b"4")])[0] == 0
    assert policy(True).settle(5, 404, [])[0] == 0
    assert policy(True).settle(5, 201, [(b"x-upstream-cost", b"4")])[0] == 4
    assert policy(False).settle(5, 500, [])[0] == 5
    assert policy(True).unanswered(5) == 0 and policy(False).unanswered(5) == 5


class Ticket:
    settled: int | None = None


class Answer:
    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self.length = None

    async def chunks(self) -> Any:
        yield b"{}"

    async def aclose(self) -> None:
        pass


class Upstreamish:
    def __init__(self, answer: Answer | None) -> None:
        self.answer = answer

    async def send(self, method: str, url: str, headers: Headers, body: Body, content_length: int | None) -> Any:
        if self.answer is None:
            raise UpstreamUnavailable("refused")
        return self.answer

    async def aclose(self) -> None:
        pass


async def exchange(upstream: Upstreamish, bill: RequestBill) -> tuple[int, dict[bytes, bytes], list[Any]]:
    sent: list[dict[str, Any]] = []
    released: list[int | None] = []

    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "headers": []}
    ticket = bill._ticket  # type: ignore[attr-defined]
    await forward(scope, receive, send, client=upstream, url="http://u/x", headers=[],  # type: ignore[arg-type]
                  extra_response_headers=[(b"x-ratelimit-limit", b"9")], max_body=1024, timeout=5.0,
                  body_start=None, on_complete=lambda done: released.append(done.settled), on_complete_args=(ticket,),
                  bill=bill)
    start = sent[0]
    return start["status"], dict(start["headers"]), released


def test_the_forwarder_settles_before_the_release_and_tells_the_client() -> None:
    ticket = Ticket()
    bill = RequestBill(policy(), 5, ticket)
    answer = Answer(200, [(b"content-length", b"2"), (b"X-Upstream-Cost", b"12")])
    status, headers, released = asyncio.run(exchange(Upstreamish(answer), bill))
    assert status == 200 and headers[b"x-request-cost"] == b"12" and b"X-Upstream-Cost" not in headers
    assert headers[b"x-ratelimit-limit"] == b"9"
    assert released == [12] and ticket.settled == 12  # settled before the slot (and settlement) went


def test_an_upstream_failure_is_charged_as_no_answer() -> None:
    for success_only, charged in ((True, b"0"), (False, b"5")):
        ticket = Ticket()
        status, headers, _ = asyncio.run(exchange(Upstreamish(None), RequestBill(policy(success_only), 5, ticket)))
        assert status == 502 and headers[b"x-request-cost"] == charged
        assert ticket.settled == int(charged)


def test_the_charge_joins_a_pre_encoded_block_byte_for_byte() -> None:
    block = EncodedHeaders(b"x-ratelimit-limit: 9\r\n")
    joined = policy().with_header(block, 7)
    assert isinstance(joined, EncodedHeaders)
    assert joined.block == trusted_headers.encode([(b"x-ratelimit-limit", b"9"), (b"x-request-cost", b"7")])
    assert policy().with_header([(b"a", b"1")], 7) == [(b"a", b"1"), (b"x-request-cost", b"7")]
    unchecked = replace(policy(), encodable=False)
    assert unchecked.with_header(block, 7) == [(b"x-ratelimit-limit", b"9"), (b"x-request-cost", b"7")]
