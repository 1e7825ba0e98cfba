"""A TCP fault proxy for tests: an asyncio relay whose behaviour switches at runtime.

There is no Toxiproxy on this machine and `tc netem` does not work, so network faults come from
here (RELIABILITY.md §5). The proxy runs its own event loop in a background thread, so a test
can drive it from sync code or from another loop:

    with FaultProxy(redis_port) as proxy:        # listens on proxy.port, relays to redis_port
        proxy.set_mode("latency", latency=0.3)   # every chunk, both ways, 300 ms late (in order)
        proxy.set_mode("blackhole")              # accept and read, deliver nothing either way
        proxy.set_mode("drop_replies")           # commands reach the server; replies vanish
        proxy.set_mode("cut_replies", cuts=5)    # the next 5 times a reply comes back (so the
                                                 # server ran the command), RST that connection
                                                 # instead of delivering it; then relay again
        proxy.set_mode("reset")                  # RST every open connection and every new one
        proxy.set_mode("refuse")                 # stop listening: connections are refused
        proxy.set_mode("pass")                   # relay again (listening again after refuse)

`count(marker)` says how many times `marker` (e.g. b"EVALSHA") went from clients towards the
server, counted as sent by the clients (also in blackhole) and as delivered (`delivered`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["pass", "latency", "blackhole", "drop_replies", "cut_replies", "reset", "refuse"]
MODES: tuple[Mode, ...] = ("pass", "latency", "blackhole", "drop_replies", "cut_replies", "reset", "refuse")
_CHUNK = 65536


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self, reset: bool) -> None:
        for writer in (self.client, self.server):
            if reset:
                _rst(writer)
            else:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        port: int = 0,
        markers: Iterable[bytes] = (b"EVALSHA",),
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.mode: Mode = "pass"
        self.latency = 0.0
        self._markers = tuple(markers)
        self.sent: Counter[bytes] = Counter()  # markers the clients sent
        self.delivered: Counter[bytes] = Counter()  # markers that reached the server
        self.connections = 0
        self.cuts_left = 0  # cut_replies: connections still to cut at their next reply
        self.cuts_done = 0
        self._links: set[_Link] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # -- control, from any thread -------------------------------------------------------

    def set_mode(self, mode: Mode, *, latency: float = 0.0, cuts: int = 0) -> None:
        """Switch behaviour; returns once open connections follow the new mode."""
        if mode not in MODES:
            raise ValueError(f"unknown fault proxy mode {mode!r}")
        self.cuts_left = cuts
        self._call(self._apply(mode, latency))

    def count(self, marker: bytes = b"EVALSHA") -> int:
        return self.sent[marker]

    def start(self) -> None:
        ready: Future[None] = Future()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            try:
                await self._listen()
            except BaseException as exc:
                ready.set_exception(exc)
                raise
            ready.set_result(None)
            await self._stopped.wait()
            await self._shutdown()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="fault-proxy")
        self._thread.start()
        ready.result(timeout=10)

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the proxy's loop ------------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        if self._loop is None:
            raise RuntimeError("the fault proxy is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, mode: Mode, latency: float) -> None:
        previous = self.mode
        self.mode, self.latency = mode, latency
        if mode == "refuse" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif previous == "refuse" and mode != "refuse":
            await self._listen()
        if mode in ("reset", "refuse"):
            for link in list(self._links):
                link.abort(reset=True)
            self._links.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort(reset=False)
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "reset":
            _rst(writer)
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _rst(writer)  # like the server refusing: the client sees its connection reset
            return
        link = _Link(writer, server_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, server_writer, towards_server=True)),
            asyncio.create_task(self._pump(link, server_reader, writer, towards_server=False)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)
        for side in (writer, server_writer):
            side.transport.abort()

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, towards_server: bool
    ) -> None:
        """Copy one direction, delaying or dropping chunks as the mode says; order is kept."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer, towards_server))
        tail = b""
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except ConnectionError:
                    data = b""
                if not data:
                    break
                if towards_server:
                    window = tail + data
                    for marker in self._markers:
                        self.sent[marker] += window.count(marker) - tail.count(marker)
                    tail = window[-32:]
                mode = self.mode
                if mode == "blackhole" or (mode == "drop_replies" and not towards_server):
                    continue
                if mode == "cut_replies" and not towards_server and self.cuts_left > 0:
                    # The server answered, so it ran (at least) the first command: the client
                    # must not learn what it decided.
                    self.cuts_left -= 1
                    self.cuts_done += 1
                    link.abort(reset=True)
                    break
                due = time.monotonic() + (self.latency if mode == "latency" else 0.0)
                queue.put_nowait((due, data))
            queue.put_nowait(None)
            await deliver
        finally:
            deliver.cancel()
            for task in link.tasks:  # one side closed: close the other
                if task is not asyncio.current_task():
                    task.cancel()

    async def _deliver(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        towards_server: bool,
    ) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            due, data = item
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if towards_server:
                for marker in self._markers:
                    self.delivered[marker] += data.count(marker)
            writer.write(data)
            try:
                await writer.drain()
            except ConnectionError:
                return
