"""Redis ban store: strike.lua, ban_index.lua and unban.lua over the admission store's
connection (same pool, budget, NOSCRIPT reload and error translation: `RedisStore.run_script`).

Key names (Redis Cluster: an IP group's keys share the group's own hash tag; the index has
its own; no script mixes the two, nor ever touches API-key or workspace keys):

    {prefix}:{ip:<h(group)>}:strikes   sorted set of strikes (strike.lua)
    {prefix}:{ip:<h(group)>}:state     hash until / bans / forget / kinds (strike.lua)
    {prefix}:{ip:<h(group)>}:lifted    the last lift's call id, a minute (unban.lua)
    {prefix}:{bans}:index              hash group -> "until bans u r c": the active bans (ban_index.lua)

A strike batch is one pipeline of strike.lua calls; the bans it imposed are then added to
the index in one more call. Should that second call fail, the ban still holds in the
group's own keys (every later strike from the group sees it) but other replicas only learn
of it from their own strikes: the failure is counted and logged (and the replica that
imposed it keeps it, gateway/admission/bans.py `BanCache`).

Replays: every call carries an id; strike.lua and unban.lua answer a replay of the same call
as they answered it first and change nothing more, and the index writes are idempotent, so a
retry layer re-sending a call after a lost reply is harmless.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from itertools import count

from gateway.config.model import Bans
from gateway.store import scripts
from gateway.store.ban_lengths import StrikeCounts, ms
from gateway.store.bans import BANNED_NOW, ActiveBan, StrikeVerdict
from gateway.store.base import NullObserver, StoreError, StoreObserver
from gateway.store.names import short_hash
from gateway.store.redis import Call, RedisStore

log = logging.getLogger(__name__)

OPERATION = "bans"  # the gateway_store_errors_total label of every ban store call
STRIKE_CHUNK = 256

_CALL_PREFIX = os.urandom(6).hex()
_call_counter = count()


def group_keys(prefix: str, group: str) -> tuple[str, str]:
    tag = f"{prefix}:{{ip:{short_hash(group)}}}"
    return f"{tag}:strikes", f"{tag}:state"


def lifted_key(prefix: str, group: str) -> str:
    return f"{prefix}:{{ip:{short_hash(group)}}}:lifted"


def new_call_id() -> str:
    return f"{_CALL_PREFIX}{next(_call_counter):x}"


def index_key(prefix: str) -> str:
    return f"{prefix}:{{bans}}:index"


def strike_call(
    prefix: str, policy: Bans, group: str, counts: StrikeCounts, call_id: str, now: str
) -> Call:
    keys = list(group_keys(prefix, group))
    args: list[str | int] = [
        call_id, counts[0], counts[1], counts[2], now, policy.strikes, repr(ms(policy.within)),
        repr(ms(policy.duration)), repr(float(policy.factor)), repr(ms(policy.max_duration)), repr(ms(policy.remember)),
    ]
    return keys, args


def decode_strike(reply: object, group: str, call_id: str) -> StrikeVerdict:
    if not isinstance(reply, list) or len(reply) != 8:
        raise StoreError(f"malformed strike reply: {reply!r:.200}")
    echoed = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
    if echoed != call_id:
        raise StoreError("strike reply belongs to another call (call id mismatch)")
    try:
        status, ms_left, bans, strikes, u, r, c = (int(value) for value in reply[1:])
    except (TypeError, ValueError) as exc:
        raise StoreError(f"malformed strike reply: {reply!r:.200}") from exc
    return StrikeVerdict(group, status, ms_left, bans, strikes, (u, r, c))


def decode_active(reply: object) -> list[ActiveBan]:
    if not isinstance(reply, list) or len(reply) % 6:
        raise StoreError(f"malformed ban list reply: {reply!r:.200}")
    try:
        return [
            ActiveBan(_text(reply[i]), int(reply[i + 1]), int(reply[i + 2]),
                      (int(reply[i + 3]), int(reply[i + 4]), int(reply[i + 5])))
            for i in range(0, len(reply), 6)
        ]
    except (TypeError, ValueError) as exc:
        raise StoreError(f"malformed ban list reply: {reply!r:.200}") from exc


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBanStore:
    def __init__(self, store: RedisStore, *, prefix: str, observer: StoreObserver | None = None) -> None:
        self._store = store
        self._prefix = prefix
        self._observer: StoreObserver = observer or NullObserver()
        self._strike_script = scripts.load("strike")
        self._index_script = scripts.load("ban_index")
        self._unban_script = scripts.load("unban")

    async def strike(
        self, policy: Bans, batch: Sequence[tuple[str, StrikeCounts]]
    ) -> list[StrikeVerdict | None]:
        verdicts: list[StrikeVerdict | None] = []
        error: StoreError | None = None
        for start in range(0, len(batch), STRIKE_CHUNK):
            chunk = batch[start : start + STRIKE_CHUNK]
            try:
                verdicts.extend(await self._strike_chunk(policy, chunk))
            except StoreError as exc:  # counted; the other chunks' verdicts still count
                error = exc
                verdicts.extend([None] * len(chunk))
        imposed = [v for v in verdicts if v is not None and v.status == BANNED_NOW]
        if imposed:
            await self._index_add(imposed)
        if error is not None and all(v is None for v in verdicts):
            raise error
        return verdicts

    async def _strike_chunk(
        self, policy: Bans, batch: Sequence[tuple[str, StrikeCounts]]
    ) -> list[StrikeVerdict | None]:
        now = self._store.now_arg()
        ids = [new_call_id() for _ in batch]
        calls = [
            strike_call(self._prefix, policy, group, counts, call_id, now)
            for (group, counts), call_id in zip(batch, ids, strict=True)
        ]
        replies = await self._run(self._strike_script, calls)
        verdicts: list[StrikeVerdict | None] = []
        failed: BaseException | None = None
        for (group, _), call_id, reply in zip(batch, ids, replies, strict=True):
            try:
                if isinstance(reply, BaseException):
                    raise reply
                verdicts.append(decode_strike(reply, group, call_id))
            except Exception as exc:  # one bad reply must not lose the others' verdicts
                failed = exc
                verdicts.append(None)
        if failed is not None:
            self._observer.store_error(OPERATION)
            log.warning("ban strikes partly failed: %r", failed)
        return verdicts

    async def _index_add(self, imposed: Sequence[StrikeVerdict]) -> None:
        args: list[str | int] = ["add", self._store.now_arg()]
        for verdict in imposed:
            args.extend((verdict.group, verdict.ms_left, verdict.bans, *verdict.kinds))
        try:
            calls: list[Call] = [([index_key(self._prefix)], args)]
            reply = (await self._store.run_script(self._index_script, calls))[0]
            if isinstance(reply, BaseException):
                raise StoreError(f"ban index add failed: {reply!r}") from reply
        except StoreError as exc:
            self._observer.store_error(OPERATION)
            log.warning("could not publish %d new ban(s) to the index: %s", len(imposed), exc)

    async def active(self) -> list[ActiveBan]:
        args: list[str | int] = ["list", self._store.now_arg()]
        reply = await self._one(self._index_script, [index_key(self._prefix)], args)
        try:
            return decode_active(reply)
        except StoreError:
            self._observer.store_error(OPERATION)
            raise

    async def lift(self, group: str) -> bool:
        now = self._store.now_arg()
        keys = [*group_keys(self._prefix, group), lifted_key(self._prefix, group)]
        args: list[str | int] = [now, new_call_id()]
        try:
            (was_banned,) = await self._store.run_script(self._unban_script, [(keys, args)])
            if isinstance(was_banned, BaseException):
                raise StoreError(f"unban failed: {was_banned!r}") from was_banned
        except StoreError:  # its reply may be lost after it ran: ask once more, a replay of the id
            was_banned = await self._one(self._unban_script, keys, args)  # answers as the first run
        listed = await self._one(self._index_script, [index_key(self._prefix)], ["remove", now, group])
        return bool(was_banned) or bool(listed)

    async def _one(self, script: scripts.Script, keys: list[str], args: list[str | int]) -> object:
        reply = (await self._run(script, [(keys, args)]))[0]
        if isinstance(reply, BaseException):
            self._observer.store_error(OPERATION)
            raise StoreError(f"{script.name} failed: {reply!r}") from reply
        return reply

    async def _run(self, script: scripts.Script, calls: list[Call]) -> list[object]:
        try:
            return await self._store.run_script(script, calls)
        except StoreError:
            self._observer.store_error(OPERATION)
            raise
