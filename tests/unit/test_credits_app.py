"""Issue 18 through the public app and the admin app, in process, on the memory store and on
Redis (GATEWAY_TEST_REDIS_URL): a settlement (refund, extra debit, `success_only` on a 500) is
seen by the next request's headers and by the admin view; a spent quota answers 402 with the
charge 0; the usage path answers the caller's numbers from one store call per second; the
quota admin endpoint wants the token, refuses bad bodies and grants exactly what it says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from gateway.admin import create_admin_app
from gateway.admission.identity import hash_key
from gateway.app import GatewayApp
from gateway.asgi import Message
from gateway.config.loader import load_config_text
from gateway.proxy.upstream import Body, Headers
from gateway.state import GatewayState
from gateway.store.base import StoreError
from tests.support.secrets import secret

pytestmark = pytest.mark.anyio

SECRET = secret("credits-app")
OTHER = secret("credits-app-other")
TOKEN = secret("credits-app-admin")
ADMIN = {"Authorization": f"Bearer {TOKEN}", "Host": "127.0.0.1:9464"}


def config_text(store_url: str, prefix: str) -> str:
    return f"""
upstream: {{url: "http://127.0.0.1:9", cost_header: X-Upstream-Cost, charge: success_only}}
store: {{url: "{store_url}", prefix: {prefix}, on_error: deny}}
usage_path: /v1/usage
admin_token: "{TOKEN}"
keys:
  - {{id: k, sha256: "{hash_key(SECRET)}", plan: metered}}
  - {{id: other, sha256: "{hash_key(OTHER)}", plan: metered}}
plans:
  metered:
    limits:
      credits: {{rate: 100/1h, counts: cost}}
      daily: {{quota: 60/1d}}
      browsers: {{concurrency: 4}}
      tight: {{rate: 3/1h, shadow: true}}
routes:
  - path: /v1/**
    limits: [credits, daily, browsers, tight]
    cost:
      - {{when: {{query: {{js_render: "true"}}}}, cost: 5, slots: 2}}
      - {{cost: 1}}
"""


class Answer:
    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self.length = None

    async def chunks(self) -> Any:
        yield b"{}"

    async def aclose(self) -> None:
        pass


class Upstream:
    """Answers `status=` with the declared cost `declare=` (query parameters); counts calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def send(self, method: str, url: str, headers: Headers, body: Body, content_length: int | None) -> Any:
        self.calls.append(url)
        query = parse_qs(url.partition("?")[2])
        out: Headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
        if "declare" in query:
            out.append((b"X-Upstream-Cost", query["declare"][0].encode()))
        return Answer(int(query.get("status", ["200"])[0]), out)

    async def aclose(self) -> None:
        pass


class Rig:
    def __init__(self, state: GatewayState, upstream: Upstream) -> None:
        self.state = state
        self.upstream = upstream
        self.app = GatewayApp(state)
        transport = httpx.ASGITransport(app=create_admin_app(state))  # type: ignore[arg-type]
        self.admin = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9464")

    async def get(
        self, target: str, secret_value: str | None = SECRET, method: str = "GET"
    ) -> tuple[int, dict[str, str], Any]:
        path, _, query = target.partition("?")
        headers = [(b"x-api-key", secret_value.encode())] if secret_value else []
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
                 "query_string": query.encode(), "scheme": "http", "client": ("198.51.100.4", 5000),
                 "headers": headers}
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = sent[0]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        names = {name.decode().lower(): value.decode() for name, value in start["headers"]}
        return start["status"], names, json.loads(body) if body else None

    async def settled(self) -> None:
        """Releases (and their settlements) are sent off the critical path: flush them."""
        flush = getattr(self.state.store, "flush", None)
        if flush is not None:
            await flush()

    async def bucket(self, name: str, key: str = "k") -> dict[str, Any]:
        await self.settled()
        view = (await self.admin.get(f"/v1/keys/{key}", headers=ADMIN)).json()
        (found,) = [b for b in view["buckets"] if b["policy"] == name]
        return found  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    upstream = Upstream()
    state = GatewayState.create(load_config_text(config_text(url, "gwcredits")), upstream=upstream)
    await state.open()
    rig = Rig(state, upstream)
    try:
        yield rig
    finally:
        await rig.admin.aclose()
        await state.aclose()


def ietf(value: str) -> dict[str, dict[str, str]]:
    items = {}
    for item in value.split(", "):
        name, *params = item.split(";")
        items[name.strip('"')] = dict(p.split("=", 1) for p in params)
    return items


async def test_settlements_show_in_the_next_headers_and_the_admin_view(rig: Rig) -> None:
    used = 0
    for target, status, charged in (
        ("/v1/a?js_render=true&declare=2", 200, 2),  # a refund: 5 charged, 2 settled
        ("/v1/a?declare=9", 200, 9),  # an extra debit: 1 charged, 9 settled
        ("/v1/a?js_render=true&status=500&declare=4", 500, 0),  # success_only: a 500 is free
        ("/v1/a?declare=x", 200, 1),  # not a number: the price stands
    ):
        got, headers, _ = await rig.get(target)
        assert (got, headers["x-request-cost"]) == (status, str(charged)), target
        assert "x-upstream-cost" not in headers
        used += charged
        await rig.settled()
        got, headers, _ = await rig.get("/v1/plain")
        used += 1
        assert got == 200 and headers["x-request-cost"] == "1"
        items = ietf(headers["ratelimit"])
        assert (items["credits"]["r"], items["daily"]["r"]) == (str(100 - used), str(60 - used)), target
        assert "tight" not in items  # a shadow limit is never in the headers
        assert (await rig.bucket("credits"))["used"] == used
        assert (await rig.bucket("daily"))["used"] == used
    # the shadow limit (3 requests an hour) would have refused every request after the third
    rig.state.metrics.flush()
    assert rig.state.metrics.shadow_refusals.labels("metered", "tight")._value.get() == 8 - 3
    assert rig.state.metrics.units_charged.labels("metered", "/v1/**")._value.get() == used


async def test_weighted_slots_in_the_headers(rig: Rig) -> None:
    got, headers, _ = await rig.get("/v1/a?js_render=true")
    assert got == 200 and headers["concurrency-remaining"] == "2"  # 4 slots, this request holds 2
    assert ietf(headers["ratelimit"])["credits"]["r"] == "95"


async def test_a_spent_quota_answers_402_and_a_grant_lets_exactly_that_through(rig: Rig) -> None:
    for _ in range(12):
        assert (await rig.get("/v1/a?js_render=true"))[0] == 200  # 60 units: the daily quota
    status, headers, body = await rig.get("/v1/a")
    assert status == 402 and body["error"] == "quota_exceeded" and body["success"] is False
    assert headers["x-request-cost"] == "0"
    assert int(headers["retry-after"]) == body["retryAfterSeconds"] > 0
    assert ietf(headers["ratelimit"])["daily"]["r"] == "0"
    assert (await rig.get("/v1/a", OTHER))[0] == 200  # per key

    url = "/v1/keys/k/quota"
    assert (await rig.admin.post(url, json={"grant": 3}, headers={"Host": "127.0.0.1:9464"})).status_code == 401
    granted = await rig.admin.post(url, json={"grant": 3}, headers=ADMIN)
    assert granted.status_code == 200, granted.text
    (quota,) = granted.json()["quotas"]
    assert (quota["used"], quota["granted"], quota["remaining"]) == (60, 3, 3)
    await asyncio.sleep(1.0)  # the refusal cache keeps a quota refusal one second at most
    answers = [await rig.get("/v1/a") for _ in range(4)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 402]
    # The headers count the grant: 60 used + 1 of 60 + 3.
    assert ietf(answers[0][1]["ratelimit"])["daily"]["r"] == "2"
    reset = await rig.admin.post(url, json={"reset": True, "limit": "daily"}, headers=ADMIN)
    assert reset.status_code == 200 and reset.json()["quotas"][0]["used"] == 0
    await asyncio.sleep(1.0)
    assert (await rig.get("/v1/a"))[0] == 200


@pytest.mark.parametrize("body", [
    {"grant": -5}, {"grant": "ten"}, {}, {"grant": 10**12}, {"grant": 1.5}, {"grant": True},
    {"grant": 1, "reset": True}, {"reset": False}, {"grant": 1, "limit": "credits"}, {"grant": 1, "extra": 1},
    [1], "grant",
])
async def test_the_quota_endpoint_refuses_bad_bodies(rig: Rig, body: Any) -> None:
    answer = await rig.admin.post("/v1/keys/k/quota", json=body, headers=ADMIN)
    assert answer.status_code == 400, (body, answer.text)
    assert answer.json()["success"] is False
    assert (await rig.bucket("daily"))["granted"] == 0


async def test_the_quota_endpoint_bounds_and_unknown_keys(rig: Rig) -> None:
    as_json = {**ADMIN, "Content-Type": "application/json"}
    big = await rig.admin.post("/v1/keys/k/quota", content=b'{"grant": 1, "pad": "' + b"x" * 4096 + b'"}',
                               headers=as_json)
    assert big.status_code == 413
    assert (await rig.admin.post("/v1/keys/k/quota", content=b"{", headers=as_json)).status_code == 400
    assert (await rig.admin.post("/v1/keys/nobody/quota", json={"grant": 1}, headers=ADMIN)).status_code == 404


async def test_the_usage_path(rig: Rig) -> None:
    assert (await rig.get("/v1/usage", None))[0] == 401
    assert (await rig.get("/v1/usage", "not-a-key"))[0] == 401
    status, headers, _ = await rig.get("/v1/a?js_render=true")
    assert status == 200
    items = ietf(headers["ratelimit"])
    status, _, body = await rig.get("/v1/usage")
    assert status == 200 and (body["key"], body["plan"]) == ("k", "metered")
    limits = {item["name"]: item for item in body["limits"]}
    assert set(limits) == {"credits", "daily", "browsers"}  # the shadow limit is left out
    assert (limits["credits"]["used"], limits["credits"]["remaining"]) == (5, int(items["credits"]["r"]))
    assert (limits["credits"]["window"], limits["credits"]["counts"]) == (3600, "cost")
    assert (limits["daily"]["used"], limits["daily"]["remaining"], limits["daily"]["period"]) == (5, 55, "1d")
    assert abs(limits["daily"]["reset"] - int(items["daily"]["t"])) <= 1
    assert (limits["browsers"]["used"], limits["browsers"]["remaining"]) == (0, 4)
    assert rig.upstream.calls == [rig.upstream.calls[0]]  # never forwarded
    # never counted: the numbers stay; the path is the gateway's for every method (never billed)
    assert (await rig.get("/v1/usage"))[2] == body
    for method in ("POST", "DELETE", "PUT"):
        status, headers, answer = await rig.get("/v1/usage", method=method)
        assert (status, headers["allow"]) == (405, "GET, HEAD") and answer["error"] == "method_not_allowed"
    # HEAD wherever GET (RFC 9110 §9.1: a general-purpose server MUST support both); the server
    # sends its head only
    status, headers, _ = await rig.get("/v1/usage", method="HEAD")
    assert status == 200 and headers["cache-control"] == "no-store"
    assert (await rig.get("/v1/usage", None, method="POST"))[0] == 401  # the key is checked first
    assert len(rig.upstream.calls) == 1
    assert (await rig.get("/v1/usage"))[2] == body


async def test_the_usage_path_costs_one_store_call_per_key_and_second(rig: Rig) -> None:
    store = rig.state.jobs.primary
    assert store is not None
    calls = []
    real = store.usage

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        await asyncio.sleep(0.01)  # concurrent callers arrive while the first read is out
        return await real(*args, **kwargs)

    store.usage = counted  # type: ignore[method-assign]
    answers = await asyncio.gather(*(rig.get("/v1/usage") for _ in range(20)))
    assert all(status == 200 for status, _, _ in answers) and len(calls) == 1
    assert (await rig.get("/v1/usage", OTHER))[0] == 200 and len(calls) == 2  # per key
    rig.app.usage.clock = lambda: 1e12  # a second later
    assert (await rig.get("/v1/usage"))[0] == 200 and len(calls) == 3


async def test_a_failed_usage_read_is_a_503_and_is_not_kept(rig: Rig) -> None:
    store = rig.state.jobs.primary
    assert store is not None
    real = store.usage
    failing = [True]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failing[0]:
            raise StoreError("down")
        return await real(*args, **kwargs)

    store.usage = flaky  # type: ignore[method-assign]
    status, headers, body = await rig.get("/v1/usage")
    assert status == 503 and body["error"] == "store_unavailable" and headers["retry-after"] == "1"
    failing[0] = False
    status, _, body = await rig.get("/v1/usage")  # asked again at once: the failure was not kept
    assert status == 200 and body["key"] == "k"
