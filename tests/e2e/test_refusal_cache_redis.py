"""The rate-refusal cache against a real Redis store: a key over its limit costs no EVALSHA for
the cached period, every 429 still goes through the ban rule, and Retry-After stays exact.

The gateway app runs in process (fake ASGI `receive`/`send`, an upstream stub) on a real
`RedisStore`; store admission calls are counted on the store instance."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis

from gateway.admission.identity import hash_key
from gateway.app import GatewayApp
from gateway.asgi import Message
from gateway.config.loader import load_config_text
from gateway.proxy.upstream import Body, Headers
from gateway.state import GatewayState
from tests.support.secrets import secret

pytestmark = pytest.mark.redis

SECRET = secret("refusal-cache")


def config_text(redis_url: str) -> str:
    return f"""
upstream: {{url: "http://127.0.0.1:9"}}
store: {{url: "{redis_url}", prefix: gwrc}}
keys:
  - {{id: k, sha256: "{hash_key(SECRET)}", plan: tiny}}
plans:
  tiny: {{limits: {{rpm: {{rate: 2/1h}}, requests: {{concurrency: 5}}}}}}
routes:
  - {{path: /v1/**, limits: [rpm, requests]}}
"""


class StubResponse:
    status = 200
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    length = 2

    async def chunks(self) -> Any:
        yield b"{}"

    async def aclose(self) -> None:
        pass


class StubUpstream:
    async def send(self, method: str, url: str, headers: Headers, body: Body, content_length: int | None) -> Any:
        return StubResponse()

    async def aclose(self) -> None:
        pass


async def request(app: GatewayApp) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    scope = {
        "type": "http", "method": "GET", "path": "/v1/x", "raw_path": b"/v1/x", "query_string": b"",
        "scheme": "http", "client": ("198.51.100.4", 5000), "headers": [(b"x-api-key", SECRET.encode())],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(body)


def test_a_key_over_its_limit_costs_no_store_call_while_its_refusal_holds(
    redis_url: str, redis_sync: redis.Redis
) -> None:
    async def scenario() -> None:
        state = GatewayState.create(load_config_text(config_text(redis_url)), upstream=StubUpstream())
        await state.open()
        store_admits = 0
        real_admit = state.store.admit

        async def counted_admit(*args: Any, **kwargs: Any) -> Any:
            nonlocal store_admits
            store_admits += 1
            return await real_admit(*args, **kwargs)

        state.store.admit = counted_admit  # type: ignore[method-assign]
        judged = 0
        real_refused = state.bans.refused

        def counted_refused(*args: Any, **kwargs: Any) -> bool:
            nonlocal judged
            judged += 1
            return real_refused(*args, **kwargs)

        state.bans.refused = counted_refused  # type: ignore[method-assign]
        app = GatewayApp(state)
        try:
            assert [(await request(app))[0] for _ in range(2)] == [200, 200]
            status, headers, body = await request(app)  # refused by Redis: remembered
            assert status == 429 and body["error"] == "rate_limited"
            assert headers[b"retry-after"] == b"3600" and headers[b"x-ratelimit-reset"] == b"3600"
            assert store_admits == 3
            rate_key = next(iter(redis_sync.scan_iter("gwrc:*:r:rpm")))
            for _ in range(20):
                status, headers, body = await request(app)
                assert status == 429 and body["error"] == "rate_limited"
                assert int(headers[b"retry-after"]) in (3599, 3600) and body["retryAfterSeconds"] == int(
                    headers[b"retry-after"])
            assert store_admits == 3  # 20 refusals, no EVALSHA
            assert redis_sync.zcard(rate_key) == 2  # and nothing written
            assert judged == 21  # every 429, cached or not, is judged by the ban rule (came back early?)
            state.metrics.flush()  # the hot path's metrics fold once per event-loop iteration
            metrics = state.metrics.registry.get_sample_value("gateway_cached_refusals_total")
            assert metrics == 20
        finally:
            await state.aclose()

    asyncio.run(scenario())
