"""A disconnect told by the server protocol (gateway/disconnects.py) instead of a watcher task.

The wire-level cases (a real uvicorn with the gateway's protocol, a client closing its socket
mid-response) are in test_forwarder_server.py; here the forwarder is driven directly with a
`DisconnectWatch` in its scope, as the gateway's protocol puts it there.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.disconnects import EXTENSION, DisconnectWatch, disconnect_watch
from tests.support.mock_upstream import MockUpstream
from tests.unit.test_forwarder import (  # noqa: F401 (fixtures)
    ClientFactory,
    FakeClient,
    anyio_backend,
    eventually,
    kind,
    make_client,
    run,
    upstream,
)

pytestmark = pytest.mark.anyio


def watched_client(watch: DisconnectWatch) -> FakeClient:
    fake = FakeClient()
    fake.scope["extensions"] = {EXTENSION: watch}
    return fake


def test_callbacks_run_once_when_the_connection_is_lost() -> None:
    watch = DisconnectWatch()
    calls: list[str] = []
    watch.add(lambda: calls.append("a"))
    gone = lambda: calls.append("b")  # noqa: E731
    watch.add(gone)
    watch.discard(gone)
    watch.discard(gone)  # twice is harmless
    watch.connection_lost()
    watch.connection_lost()
    assert calls == ["a"]
    watch.add(lambda: calls.append("late"))  # registered after the loss: told at once
    assert calls == ["a", "late"]


def test_the_watch_is_found_only_when_the_server_offers_it() -> None:
    watch = DisconnectWatch()
    assert disconnect_watch({"type": "http"}) is None
    assert disconnect_watch({"type": "http", "extensions": {}}) is None
    assert disconnect_watch({"type": "http", "extensions": {EXTENSION: watch}}) is watch


async def test_a_lost_connection_stops_the_exchange_without_a_watcher_task(
    upstream: MockUpstream, make_client: ClientFactory
) -> None:
    client = make_client(upstream.url)
    watch = DisconnectWatch()
    fake = watched_client(watch)
    stats = upstream.stats.key("k1")
    before = asyncio.all_tasks()
    task = asyncio.create_task(run(client, fake, f"{upstream.url}/delay_headers?ms=10000"))
    await eventually(lambda: stats.in_flight == 1)
    started = asyncio.all_tasks() - before
    # The forwarding task itself, and the upstream client's own tasks if any: no watcher awaiting receive().
    assert not any("_watch" in repr(t.get_coro()) for t in started)
    watch.connection_lost()
    assert await asyncio.wait_for(task, 2) == "disconnected"
    assert fake.status is None
    await eventually(lambda: stats.disconnects == 1)
    assert stats.completed == 0


async def test_a_client_gone_before_the_exchange_sends_nothing_upstream(
    upstream: MockUpstream, make_client: ClientFactory
) -> None:
    watch = DisconnectWatch()
    watch.connection_lost()  # left while it was being admitted
    fake = watched_client(watch)
    assert await run(make_client(upstream.url), fake, f"{upstream.url}/echo") == "disconnected"
    assert fake.status is None
    assert upstream.stats.key("k1").arrivals == []


async def test_a_finished_exchange_leaves_no_callback_behind(
    upstream: MockUpstream, make_client: ClientFactory
) -> None:
    client = make_client(upstream.url)
    watch = DisconnectWatch()
    for _ in range(3):  # keep-alive: several requests on one connection
        fake = watched_client(watch)
        assert await run(client, fake, f"{upstream.url}/echo") == 200
        assert fake.complete
    calls: list[int] = []
    watch.add(lambda: calls.append(1))
    watch.connection_lost()
    assert calls == [1]  # only the one registered here: the three exchanges had unregistered
    assert upstream.stats.key("k1").disconnects == 0
