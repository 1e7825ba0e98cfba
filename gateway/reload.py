"""Hot reload: SIGHUP or a change of the config file applies new plans, keys, routes, headers
and upstream URL/headers to new requests, without resetting counters (store key names carry
no numbers) and without touching requests in flight (each keeps the `Routing` it started with).

The file is parsed in a child process within `RELOAD_BUDGET` (`gateway.config.isolated`), so a
large, slow or hostile file never holds the event loop. A reload that fails for any reason (an
invalid file, the budget, a crash of the loader) changes nothing: the running config stays,
the problems are logged, and `gateway_config_reloads_total{result="error"}` counts it; the file
watcher and SIGHUP keep working. Reloads run one at a time; a trigger that arrives during one
runs once more after it, so the last edit always wins. Settings bound to resources opened at
start (listen addresses, the store, the upstream connection pool) need a restart: a reload keeps
their running values and says so in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Mapping

from gateway.config.admin_access import admin_exposure_problem
from gateway.config.isolated import RELOAD_BUDGET, load_config_isolated
from gateway.config.loader import ConfigError, load_config
from gateway.config.model import Config
from gateway.config.units import parse_host_port
from gateway.gc_tuning import refreeze
from gateway.runtime import Routing
from gateway.state import GatewayState

log = logging.getLogger("gateway.reload")


def keep_restart_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with every restart-only setting put back to its running value, and their names."""
    kept: list[str] = []
    for name in ("listen", "admin_listen", "store", "client_keep_alive"):
        if getattr(new, name) != getattr(running, name):
            kept.append(name)
    upstream = new.upstream
    for name in ("client", "connect_timeout", "max_connections", "keep_alive"):
        if getattr(upstream, name) != getattr(running.upstream, name):
            kept.append(f"upstream.{name}")
            upstream = dataclasses.replace(upstream, **{name: getattr(running.upstream, name)})
    merged = dataclasses.replace(
        new, listen=running.listen, admin_listen=running.admin_listen, store=running.store, upstream=upstream,
        client_keep_alive=running.client_keep_alive,
    )
    return merged, kept


def apply_config(state: GatewayState, config: Config, path: str) -> bool:
    """Swap a loaded config in (restart-only settings kept); False when it cannot be applied."""
    config, kept = keep_restart_only(state.routing.config, config)
    # admin_listen keeps its running value, so the file's admin_token / admin_open are checked
    # against the address the admin port really listens on
    refusal = admin_exposure_problem(
        config.admin_listen, parse_host_port(config.admin_listen)[0], config.admin_token, config.admin_open
    )
    if refusal is not None:
        return _refused(state, [f"{path}: admin_listen: {refusal}"])
    for name in kept:
        log.warning("reload: %s changed but needs a restart; keeping the running value", name)
    state.routing = Routing.build(config)
    refreeze()  # the old config's objects are no longer long-lived
    state.metrics.config_reloads.labels("success").inc()
    log.info("config reloaded from %s", path)
    return True


def _refused(state: GatewayState, problems: list[str]) -> bool:
    state.metrics.config_reloads.labels("error").inc()
    for problem in problems:
        log.error("reload refused, keeping the running config: %s", problem)
    return False


def reload_config(state: GatewayState, path: str, overrides: Mapping[str, str]) -> bool:
    """Load the file in this process and swap it in (for tests and tools; the server uses `Reloader`)."""
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        return _refused(state, exc.problems)
    return apply_config(state, config, path)


class Reloader:
    """The server's one door to reloading: SIGHUP and the file watcher both come through here."""

    def __init__(
        self, state: GatewayState, path: str, overrides: Mapping[str, str], budget: float = RELOAD_BUDGET
    ) -> None:
        self.state = state
        self.path = path
        self.overrides = overrides
        self.budget = budget
        self._lock = asyncio.Lock()
        self._again = False
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self) -> None:
        """Reload soon (from a signal handler): never blocks, never raises."""
        task = asyncio.get_running_loop().create_task(self._requested())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _requested(self) -> None:
        await self.reload()

    async def reload(self) -> bool:
        """Load off the loop and apply; coalesces with a reload already running."""
        if self._lock.locked():
            self._again = True  # the running one re-reads the file when it finishes
            return False
        async with self._lock:
            applied = await self._reload_once()
            while self._again:
                self._again = False
                applied = await self._reload_once()
            return applied

    async def _reload_once(self) -> bool:
        try:
            config = await load_config_isolated(self.path, self.overrides, self.budget)
            return apply_config(self.state, config, self.path)
        except ConfigError as exc:
            return _refused(self.state, exc.problems)
        except Exception as exc:  # the running config must survive whatever the reload meets
            log.exception("reload failed, keeping the running config")
            return _refused(self.state, [f"{self.path}: {type(exc).__name__}: {exc}"[:300]])

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


SETTLE = 2.0  # seconds a changed file must stay unchanged before the watcher reads it


async def watch_file(reloader: Reloader, interval: float = 1.0, settle: float = SETTLE) -> None:
    """Reload once the file's mtime, size or inode has changed and then stayed unchanged for
    `settle` seconds (editors and ConfigMap updates replace files by rename, so the inode counts
    too). Never ends on a failed reload.

    Why settle: a file rewritten in place (`cat new > gw.yaml`, scp, a slow copy) is, between
    its writes, a shorter file that is often valid YAML; read then, keys and routes vanish and
    valid clients get 401s (ban strikes) until the next poll. A file that changed while it was
    being loaded is read again once it settles."""
    loop = asyncio.get_running_loop()
    seen = _signature(reloader.path)
    changed_at: float | None = None  # when `seen` last changed, until it is loaded
    while True:
        await asyncio.sleep(interval)
        current = _signature(reloader.path)
        if current != seen:
            seen, changed_at = current, loop.time()
        elif current is not None and changed_at is not None and loop.time() - changed_at >= settle:
            changed_at = None
            await reloader.reload()
            if _signature(reloader.path) != seen:  # written to during the load: not what was read
                seen, changed_at = _signature(reloader.path), loop.time()
