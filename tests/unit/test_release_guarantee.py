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


def test_a_waiter_admitted_then_failing_in_the_wait_loop_frees_its_slot() -> None:
    """The wait loop's own cleanup fails right after a recheck admitted the waiter: the slot
    it was just given is released, not carried off by the exception."""
    from gateway.admission import waiting
    from gateway.admission.buckets import AdmissionPlan, BucketInfo
    from gateway.admission.controller import Admission
    from gateway.metrics import Metrics
    from gateway.store.base import SlotBucket
    from gateway.store.memory import MemoryStore

    bucket = SlotBucket("gw:{k:1}:c:requests", 1)
    plan = AdmissionPlan("p", (), (), (bucket,), (BucketInfo("requests", 1, 0.0),), 2.0)

    async def receive() -> Message:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def scenario() -> None:
        store = MemoryStore(30.0)
        admission = Admission(store, on_error="deny", metrics=Metrics())
        holder = await admission.admit(plan)
        assert holder.admitted
        real_watch = store.watch

        def watch_whose_unwatch_fails(*args: Any) -> Any:
            unwatch = real_watch(*args)

            def failing() -> None:
                unwatch()
                raise RuntimeError("injected: unwatch failed")

            return failing

        store.watch = watch_whose_unwatch_fails  # type: ignore[method-assign]
        waiter = asyncio.create_task(waiting.wait(admission, plan, await admission.admit(plan), receive))
        await asyncio.sleep(0.05)
        admission.release(plan, holder)  # wakes the waiter: its recheck admits it
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(waiter, 2)
        assert (await store.usage([], [bucket])).slot_counts == [0]

    asyncio.run(scenario())
