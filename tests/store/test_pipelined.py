"""The pipelined Redis connection (gateway/store/pipelined.py) on its own: order, batching,
deadlines (lag-aware), lost connections, login, and which URLs it takes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.store.base import StoreError
from gateway.store.pipelined import Endpoint, PipelinedRedis, ReplyError, pack_command
from tests.support.redis_server import private_redis
from tests.support.secrets import secret

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,  # what the gateway runs on: timers fire before reads
}


def run(loop_name: str, coroutine: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(coroutine)


class SilentServer:
    """Accepts connections, reads everything, answers nothing (a frozen Redis)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.received = b""

    async def __aenter__(self) -> SilentServer:
        outer = self

        class Silent(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                outer.connections += 1

            def data_received(self, data: bytes) -> None:
                outer.received += data

        self.server = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


class CountingTransport:
    """Records every write on its way to the real transport."""

    def __init__(self, real: asyncio.Transport, writes: list[bytes]) -> None:
        self._real, self._writes = real, writes

    def write(self, data: bytes) -> None:
        self._writes.append(data)
        self._real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def endpoint(port: int, *, db: int = 0, password: str | None = None) -> Endpoint:
    return Endpoint("127.0.0.1", port, None, db, None, password)


@pytest.mark.redis
@pytest.mark.parametrize("loop_name", LOOPS)
def test_replies_reach_their_callbacks_in_order_and_one_iteration_is_one_write(loop_name: str) -> None:
    with private_redis() as server:
        async def scenario() -> None:
            client = PipelinedRedis(endpoint(server.port), timeout=2.0)
            assert await client.call("PING") == b"PONG"  # connected
            protocol = client._protocol
            assert protocol is not None and protocol.transport is not None
            writes: list[bytes] = []
            protocol.transport = CountingTransport(protocol.transport, writes)  # type: ignore[assignment]
            replies: list[object] = []
            for i in range(200):
                client.send(pack_command(("INCR", "n")), replies.append)
                if i == 100:
                    client.send(pack_command(("NOSUCHCOMMAND",)), replies.append)
            assert await client.call("GET", "n") == b"200"
            assert replies[:101] == list(range(1, 102))
            assert isinstance(replies[101], ReplyError)  # an error is a value, in its place
            assert replies[102:] == list(range(102, 201))
            assert len(writes) == 1  # all 202 commands of this iteration went out in one write
            assert writes[0].count(b"INCR") == 200
            await client.aclose()

        run(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_silent_server_fails_every_waiting_command_after_the_timeout(loop_name: str) -> None:
    async def scenario() -> None:
        async with SilentServer() as silent:
            client = PipelinedRedis(endpoint(silent.port), timeout=0.2)
            started = time.monotonic()
            replies = await asyncio.gather(client.call("PING"), client.call("PING"))
            elapsed = time.monotonic() - started
            assert all(isinstance(reply, StoreError) for reply in replies)
            assert "did not answer within 0.2s" in str(replies[0])
            assert 0.2 - 0.002 <= elapsed < 0.6  # uvloop's clock is libuv's, cached per iteration in ms
            assert silent.received.count(b"PING") == 2
            # The stalled connection was closed; the next command opens a new one.
            assert isinstance(await client.call("PING"), StoreError)
            assert silent.connections == 2
            await client.aclose()

    run(loop_name, scenario())


@pytest.mark.redis
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reply_that_arrived_in_time_is_not_failed_because_the_loop_was_busy(loop_name: str) -> None:
    with private_redis() as server:
        async def scenario() -> None:
            client = PipelinedRedis(endpoint(server.port), timeout=0.1)
            assert await client.call("PING") == b"PONG"
            future = asyncio.ensure_future(client.call("ECHO", "late but fine"))
            await asyncio.sleep(0)  # the command is written
            await asyncio.sleep(0)
            time.sleep(0.3)  # the loop is blocked (saturation) past the deadline; Redis answered long ago
            assert await future == b"late but fine"
            await client.aclose()

        run(loop_name, scenario())


@pytest.mark.redis
def test_a_lost_connection_fails_what_waits_and_the_next_command_reconnects() -> None:
    with private_redis() as server:
        async def scenario() -> None:
            client = PipelinedRedis(endpoint(server.port), timeout=2.0)
            assert await client.call("PING") == b"PONG"
            blocked = asyncio.ensure_future(client.call("BLPOP", "never", "0"))  # waits in Redis
            await asyncio.sleep(0.05)
            server.client().client_kill_filter(_type="normal", skipme=True)
            reply = await asyncio.wait_for(blocked, 2)
            assert isinstance(reply, StoreError)
            assert await client.call("PING") == b"PONG"
            await client.aclose()
            assert isinstance(await client.call("PING"), StoreError)  # closed stays closed

        asyncio.run(scenario())


def test_an_unreachable_server_fails_fast() -> None:
    async def scenario() -> None:
        client = PipelinedRedis(endpoint(1), timeout=1.0)
        started = time.monotonic()
        reply = await client.call("PING")
        assert isinstance(reply, StoreError) and "cannot connect" in str(reply)
        assert time.monotonic() - started < 0.5
        await client.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_login_and_database_come_from_the_url_and_the_password_is_never_shown() -> None:
    password = secret("redis-password")
    with private_redis() as server:
        server.client().config_set("requirepass", password)

        async def scenario() -> None:
            wrong = PipelinedRedis(Endpoint.from_url(f"redis://:nope@127.0.0.1:{server.port}/0"),  # type: ignore[arg-type]
                                   timeout=1.0)
            reply = await wrong.call("PING")
            assert isinstance(reply, (StoreError, ReplyError))
            await wrong.aclose()

            url = f"redis://:{password}@127.0.0.1:{server.port}/3"
            right = PipelinedRedis(Endpoint.from_url(url), timeout=1.0)  # type: ignore[arg-type]
            assert await right.call("SET", "where", "db3") == b"OK"
            await right.aclose()

        asyncio.run(scenario())
        import redis

        check = redis.Redis(port=server.port, password=password, db=3)
        assert check.get("where") == b"db3"
        assert redis.Redis(port=server.port, password=password, db=0).get("where") is None


def test_login_failure_messages_carry_no_password() -> None:
    async def scenario() -> None:
        async with SilentServer() as silent:
            password = secret("pw")
            client = PipelinedRedis(Endpoint.from_url(f"redis://:{password}@127.0.0.1:{silent.port}/0"),  # type: ignore[arg-type]
                                    timeout=0.1)
            reply = await client.call("PING")
            assert isinstance(reply, StoreError) and password not in str(reply)
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_server_full_of_clients_is_not_called_a_refused_login() -> None:
    """Redis greets a connection over `maxclients` with an error before reading anything: the
    first reply the transport reads, where the login's is expected. It was reported as "refused
    the login or SELECT", sending the operator to the password."""
    password = secret("redis-password")
    with private_redis("--maxclients", "1") as server:
        holder = server.client()
        holder.config_set("requirepass", password)
        holder.execute_command("AUTH", password)

        async def scenario() -> None:
            client = PipelinedRedis(endpoint(server.port, db=2, password=password), timeout=1.0)
            reply = await client.call("PING")
            await client.aclose()
            assert isinstance(reply, StoreError), reply
            assert "Redis refused the connection" in str(reply) and "max number of clients" in str(reply)
            assert "login" not in str(reply) and password not in str(reply)

        asyncio.run(scenario())
        holder.close()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6380/2", Endpoint("127.0.0.1", 6380, None, 2, None, None)),
        ("redis://localhost", Endpoint("localhost", 6379, None, 0, None, None)),
        ("redis://u%40x:p%3Aw@h:1/0", Endpoint("h", 1, None, 0, "u@x", "p:w")),
        ("redis://:pw@h:1?db=4", Endpoint("h", 1, None, 4, None, "pw")),
        ("unix:///run/redis.sock?db=1", Endpoint(None, 0, "/run/redis.sock", 1, None, None)),
        # Left to redis-py: TLS, Sentinel, Cluster, options this client would ignore.
        ("rediss://h:1/0", None),
        ("redis+sentinel://h:26379/mymaster", None),
        ("redis+cluster://h:1", None),
        ("redis://h:1/0?socket_keepalive=true", None),
        ("redis://h:1/notadb", None),
    ],
)
def test_which_urls_the_pipelined_connection_takes(url: str, expected: Endpoint | None) -> None:
    assert Endpoint.from_url(url) == expected


@pytest.mark.redis
@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_tcp_connection_asks_the_kernel_to_probe_an_idle_peer(loop_name: str) -> None:
    import socket

    with private_redis() as server:
        async def scenario() -> None:
            client = PipelinedRedis(endpoint(server.port), timeout=1.0)
            assert await client.call("PING") == b"PONG"
            protocol = client._protocol
            assert protocol is not None and protocol.transport is not None
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            await client.aclose()

        run(loop_name, scenario())
