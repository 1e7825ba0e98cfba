"""Hot reload: SIGHUP or a change of the config file applies new plans, keys, routes, headers
and upstream URL/headers to new requests, without resetting counters (store key names carry
no numbers) and without touching requests in flight (each keeps the `Routing` it started with).

A file that fails validation changes nothing: the running config stays, the problems are
logged, and `gateway_config_reloads_total{result="error"}` counts it. Settings bound to
resources opened at start (listen addresses, the store, the upstream connection pool) need a
restart: a reload keeps their running values and says so in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Mapping

from gateway.config.loader import ConfigError, load_config
from gateway.config.model import Config
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


def reload_config(state: GatewayState, path: str, overrides: Mapping[str, str]) -> bool:
    """Validate the file and swap it in; False (and the old config kept) when it is invalid."""
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        state.metrics.config_reloads.labels("error").inc()
        for problem in exc.problems:
            log.error("reload refused, keeping the running config: %s", problem)
        return False
    config, kept = keep_restart_only(state.routing.config, config)
    for name in kept:
        log.warning("reload: %s changed but needs a restart; keeping the running value", name)
    state.routing = Routing.build(config)
    refreeze()  # the old config's objects are no longer long-lived
    state.metrics.config_reloads.labels("success").inc()
    log.info("config reloaded from %s", path)
    return True


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


async def watch_file(state: GatewayState, path: str, overrides: Mapping[str, str], interval: float = 1.0) -> None:
    """Reload whenever the file's mtime, size or inode changes (editors and ConfigMap updates
    replace files by rename, so the inode counts too)."""
    seen = _signature(path)
    while True:
        await asyncio.sleep(interval)
        current = _signature(path)
        if current is not None and current != seen:
            seen = current
            reload_config(state, path, overrides)
