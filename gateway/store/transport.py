"""The one door from the Redis store to Redis: a `Transport` runs Lua scripts (one, or a batch
in one round trip), queues the admission hot path's calls and releases (`send_eval`,
`release`, `flush`), pings, and closes. Two implementations, each in its own module:

- `PipelinedRedis` (gateway/store/pipelined.py): one pipelined hiredis connection, for plain
  `redis://` and `unix://` URLs (the fast path);
- `RedisPyTransport` (gateway/store/redis_client.py): redis-py pools, for TLS, Sentinel and
  Cluster.

What both promise, so that the store above them keeps admission semantics only:
- Nothing that may have run is ever sent twice. A connection lost before a reply surfaces as
  `ConnectionLost` (raised by `eval_batch`) and only the caller, who knows whether its script
  is safe to run twice, may send it again.
- A call Redis refused without running it (NOSCRIPT: scripts flushed, restarted, failed over;
  READONLY: a demoted master) waits for one shared fix, whoever met it first starts it and
  everyone else joins (`ScriptSet.reload`, single flight), then goes again once, with a fresh
  budget: 1,000 calls meeting NOSCRIPT at once cost one SCRIPT LOAD per script.
- Every script runs with its source as `scripts.load` assembled it (the "now" preamble).
- A release (ZREM) that did not land is sent again until it lands or `release_retry_for` (the
  lease) has passed: a slot must not look held long after an outage. ZREM is idempotent.
- Cluster: each primary's calls and releases in pipelines of their own (`failure_domain` names
  the primary of a hash tag): one primary down or stalled fails and delays its own only.
- The hot path costs no task per call: `send_eval` queues one EVALSHA with a callback; every
  call queued during one loop iteration goes out together (one write, or one pipeline), and a
  release queued before a call is applied by Redis before it (a slot freed before an admission
  was issued is free when Redis decides it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.store.base import StoreError
from gateway.store.scripts import Script

Call = tuple[list[str], list[str | int]]
OnReply = Callable[[object], None]


class ConnectionLost(StoreError):
    """The connection failed before this command's reply came (or could not be opened): the
    command may or may not have run. Only a caller whose command is safe to run twice may
    send it again (admit.lua is, by its lease id); no transport re-sends anything."""


class ScriptSet:
    """The scripts a transport keeps loaded, and the one reload everyone waits for."""

    def __init__(self, load_all: Callable[[Sequence[Script]], Awaitable[Sequence[object]]]) -> None:
        self._load_all = load_all
        self._scripts: list[Script] = []
        self.generation = 0  # bumped by every completed load
        self._reloading: asyncio.Future[None] | None = None

    def add(self, script: Script) -> None:
        if script not in self._scripts:
            self._scripts.append(script)

    async def load(self) -> None:
        """SCRIPT LOAD every script (all in one go) and check Redis hashed them as we did."""
        scripts = list(self._scripts)
        shas = await self._load_all(scripts)
        for script, sha in zip(scripts, shas, strict=True):
            if isinstance(sha, BaseException):
                raise sha
            text = sha.decode() if isinstance(sha, bytes) else sha
            if text != script.sha:
                raise StoreError(f"Redis hashed {script.name}.lua as {text}, expected {script.sha}")
        self.generation += 1

    async def reload(self, sent_with: int) -> None:
        """NOSCRIPT met by a call sent at generation `sent_with`: if a reload completed since,
        just go again; else join the reload in flight, or start the one others will join."""
        if self.generation > sent_with:
            return
        await shared(self, "_reloading", self.load)


async def shared(owner: Any, attribute: str, start: Callable[[], Awaitable[None]]) -> None:
    """Single flight: await `owner.<attribute>` if it is still running, else start it with
    `start()`. A waiter's timeout or cancellation never cancels the shared work."""
    running: asyncio.Future[None] | None = getattr(owner, attribute)
    if running is None or running.done():
        running = asyncio.ensure_future(start())
        running.add_done_callback(_consume_exception)
        setattr(owner, attribute, running)
    await asyncio.shield(running)


def _consume_exception(future: asyncio.Future[None]) -> None:
    """A shared job's failure is raised to every waiter; with none left nobody retrieves it."""
    if not future.cancelled():
        future.exception()


class Transport:
    """The interface (see the module docstring); `eval` is `eval_batch` of one."""

    scripts: ScriptSet
    # Called once per failed release (the store counts it); set by the store.
    on_release_error: Callable[[], None]
    # How many loop iterations after `release` its ZREM is written (the next one: its flush).
    release_turns: int = 1
    # How long a release (ZREM) that did not land is sent again: the lease, set by the store
    # (after it, the slot has expired unrenewed).
    release_retry_for: float = 30.0
    # Several independent servers (Cluster): which one decides a call over a hash tag's keys
    # now, None while that is not known; None itself for one server. (AdmissionStore)
    failure_domain: Callable[[str], object] | None = None

    def send_eval(self, script: Script, keys: list[str], args: list[str | int], on_reply: OnReply) -> None:
        """The hot path: queue one EVALSHA, sent with every call queued in this loop iteration.
        `on_reply` gets the reply, or the error in its place (never raised), exactly once;
        ConnectionLost: it may have run. Nothing is re-sent here, except what `needs_reload`
        tells the caller to send again."""
        raise NotImplementedError

    def send_release_eval(self, script: Script, keys: list[str], args: list[str | int], on_reply: OnReply) -> None:
        """`send_eval` of a script that releases (settle.lua): ordered like `release`, before any
        call queued after it. On one pipelined connection that is `send_eval` itself."""
        raise NotImplementedError

    def eval_format(self, script: Script, keys: list[str], args: list[str | int], holes: Sequence[str]) -> bytes | None:
        """The EVALSHA of `script` packed once as a bytes %-format with `holes` (marker
        arguments) left open (pipelined.command_format), for `send_packed`; None when this
        transport takes calls as lists only (redis-py: `send_eval`)."""
        return None

    def send_packed(self, command: bytes, on_reply: OnReply) -> None:
        """`send_eval` of an `eval_format` filled in (only on a transport that gave one)."""
        raise NotImplementedError

    def needs_reload(self, reply: object) -> bool:
        """`send_eval`'s error reply says the scripts are gone and the call did not run: the
        caller waits for `scripts.reload` and sends it again (False: the transport did that)."""
        return False

    def release(self, keys: Sequence[str], members: Sequence[str], channels: Sequence[str]) -> None:
        """Queue ZREM `members` (a lease's, base.lease_members) from each key (idempotent: sent
        again if its connection was lost), then PUBLISH "1" on `channels` once they have landed.
        Applied before any `send_eval` queued after it. Failures go to `on_release_error`,
        never raised."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Wait until everything queued so far has been answered (or has failed)."""
        raise NotImplementedError

    async def zrem(self, key: str, member: str, *, budget: float) -> None:
        """ZREM on the connection the hot path uses; raises on failure."""
        raise NotImplementedError

    async def eval_batch(self, script: Script, calls: Sequence[Call], *, budget: float) -> list[object]:
        """EVALSHA every call in one round trip. Replies in order, an error reply as the
        exception instance in its place. Raises ConnectionLost when the connection was lost
        (some calls may have run), StoreError or TimeoutError past `budget` per round."""
        raise NotImplementedError

    async def eval(self, script: Script, keys: list[str], args: list[str | int], *, budget: float) -> object:
        (reply,) = await self.eval_batch(script, [(keys, args)], budget=budget)
        return reply

    async def ping(self) -> None:
        """Raises unless Redis answers."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop everything queued or running (the store closes its redis-py connection)."""
        raise NotImplementedError


# A release that did not land is sent again after a pause doubling from the first to the second.
RELEASE_RETRY_PAUSE = 0.005
RELEASE_RETRY_PAUSE_MAX = 0.1


def release_can_land(reply: BaseException) -> bool:
    """Can a ZREM that failed with `reply` land if sent again? Not against a key of another
    type (another program's, under the prefix): it would fail the same way every time. A
    permission error (NOPERM: the store's ACL user may not ZREM, or not that key) is sent
    again: an operator fixes the ACL (admissions and releases fail for every key meanwhile),
    and the release then lands at once instead of its slot looking held for the rest of a lease."""
    return not str(reply).startswith("WRONGTYPE")


def ignore() -> None:
    """The default `on_release_error`."""
