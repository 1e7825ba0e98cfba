"""The slot is released from the instant admission returns: an error of the gateway's own
between the admission and the exchange (here: building the upstream request headers) still
frees it, so the next request of a one-slot key is admitted rather than refused for good
(the heartbeat would renew a leaked lease forever)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import app as app_module
from gateway.admission.identity import hash_key
from gateway.app import GatewayApp
from gateway.asgi import Message
from gateway.config.loader import load_config_text
from gateway.proxy.upstream import Body, Headers
from gateway.state import GatewayState
from tests.support.secrets import secret

SECRET = secret("release-guarantee")
CONFIG = f"""
upstream: {{url: "http://127.0.0.1:9"}}
store: {{url: "memory://"}}
keys:
  - {{id: k, sha256: "{hash_key(SECRET)}", plan: one}}
plans:
  one: {{limits: {{requests: {{concurrency: 1}}}}}}
routes:
  - {{path: /v1/**, limits: [requests]}}
"""


class StubResponse:
    status = 200
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]

    async def chunks(self) -> Any:
        yield b"{}"

    async def aclose(self) -> None:
        pass


class StubUpstream:
    async def send(self, method: str, url: str, headers: Headers, body: Body, content_length: int | None) -> Any:
        return StubResponse()

    async def aclose(self) -> None:
        pass


async def request(app: GatewayApp) -> int:
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
    return int(sent[0]["status"])


def test_an_error_between_admission_and_the_exchange_frees_the_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_headers(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected: building the upstream headers failed")

    async def scenario() -> None:
        state = GatewayState.create(load_config_text(CONFIG), upstream=StubUpstream())
        await state.open()
        app = GatewayApp(state)
        try:
            assert await request(app) == 200
            with monkeypatch.context() as patched:
                patched.setattr(app_module, "upstream_request_headers", broken_headers)
                for _ in range(3):
                    with pytest.raises(RuntimeError, match="injected"):
                        await request(app)
            assert await request(app) == 200  # the one slot is free: nothing leaked
            assert state.active_requests == 0
        finally:
            await state.aclose()

    asyncio.run(scenario())
