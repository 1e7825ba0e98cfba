"""A fault proxy that strikes once, at one command: "after the command was forwarded and
before its reply", or "the command lands after the client gave up".

`arm(marker, action)` picks the next chunk sent towards the server that contains `marker`
(e.g. one Lua script's SHA1, as EVALSHA carries it):

- "cut":  the chunk reaches the server; every reply on that connection from then on is
          dropped, and the connection is reset `cut_after` seconds later (the client sees a
          connection error with its command already run).
- "mute": the chunk reaches the server; its reply (and any later one on that connection)
          never comes: the client times out with its command already run.
- "late": the chunk is held `late_by` seconds and then delivered, its reply dropped: the
          client times out first, and the command runs after it gave up.

Everything else passes. `struck` counts the faults dealt.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from tests.support.fault_proxy import FaultProxy, _Link

Action = Literal["cut", "mute", "late"]


class _Watched:
    """The client-to-server reader of one link: deals the armed fault."""

    def __init__(self, reader: asyncio.StreamReader, proxy: OneShotFaultProxy, link: _Link) -> None:
        self._reader = reader
        self._proxy = proxy
        self._link = link

    async def read(self, n: int) -> bytes:
        data = await self._reader.read(n)
        armed = self._proxy.armed
        if not data or armed is None or armed[0] not in data:
            return data
        self._proxy.armed = None
        self._proxy.struck += 1
        self._proxy.muted.add(self._link)  # no reply from here on reaches the client
        action = armed[1]
        if action == "cut":
            asyncio.get_running_loop().call_later(self._proxy.cut_after, self._link.abort, True)
        elif action == "late":
            await asyncio.sleep(self._proxy.late_by)
        return data


class _Muted:
    """The server-to-client reader of one link: nothing once the link is muted."""

    def __init__(self, reader: asyncio.StreamReader, proxy: OneShotFaultProxy, link: _Link) -> None:
        self._reader = reader
        self._proxy = proxy
        self._link = link

    async def read(self, n: int) -> bytes:
        while True:
            data = await self._reader.read(n)
            if not data or self._link not in self._proxy.muted:
                return data


class OneShotFaultProxy(FaultProxy):
    def __init__(self, target_port: int, *, cut_after: float = 0.05, late_by: float = 0.5, **kwargs: Any) -> None:
        super().__init__(target_port, **kwargs)
        self.cut_after = cut_after
        self.late_by = late_by
        self.armed: tuple[bytes, Action] | None = None
        self.muted: set[_Link] = set()
        self.struck = 0

    def arm(self, marker: bytes, action: Action) -> None:
        self.armed = (marker, action)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, towards_server: bool
    ) -> None:
        wrapped: Any = _Watched(reader, self, link) if towards_server else _Muted(reader, self, link)
        await super()._pump(link, wrapped, writer, towards_server=towards_server)
