"""Running the gateway: sockets, workers, signals, drain.

One worker process runs two uvicorn servers on one event loop: the public proxy and the
admin port, over sockets bound by the parent (so `--workers N` processes share them). The
worker owns its resources (`GatewayState`) outside uvicorn's lifespan and owns the signals:

- SIGTERM / SIGINT: drain. `/readyz` turns 503 and new requests get 503 at once; requests in
  progress (admitted, or still reading their body or waiting for a slot, which may still be
  admitted) get `shutdown_grace` to finish; then the app cuts what is left (503
  `shutting_down`, or a response cut mid-body; their slots and queue entries are released in
  their `finally`) and the servers stop; the store flushes pending releases last. Exit code 0.
- SIGHUP, or a change of the config file: reload it (see `gateway.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import uvicorn

from gateway import log_writer
from gateway.accesslog import AccessLog
from gateway.admin import create_admin_app
from gateway.app import GatewayApp
from gateway.config.loader import ConfigError, load_config
from gateway.config.model import Config, default_per_client
from gateway.config.store_url import StoreUrlError, redact
from gateway.config.units import parse_host_port, quote
from gateway.connection_limits import (
    ADMIN_LIMITS,
    ConnectionGuard,
    ConnectionLimits,
    default_total,
    limits_following,
    open_file_limit,
    raise_open_file_limit,
)
from gateway.connection_limits import LIMITS as CONNECTION_LIMITS
from gateway.edge import edge_protocol
from gateway.gc_tuning import settle_heap
from gateway.logs import configure_logging
from gateway.reload import Reloader, watch_file
from gateway.state import GatewayState

log = logging.getLogger("gateway")


class ServeError(Exception):
    """The gateway cannot start; the message is the one-line reason."""


@dataclass(frozen=True)
class ServeOptions:
    config_path: str
    overrides: Mapping[str, str]
    workers: int = 1


def bind(address: str) -> socket.socket:
    host, port = parse_host_port(address)  # validated at config load; brackets removed
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {address}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class SignalFreeServer(uvicorn.Server):
    """uvicorn's server without its signal handling: the worker handles signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(
    app: object, config: Config, *, public: bool, running: Callable[[], Config] | None = None,
    connections: ConnectionGuard | None = None,
) -> uvicorn.Config:
    """`running` (the config in force, read per request head) turns on the gateway's guards:
    head limits, head and send deadlines, and `connections`' bounds (gateway/edge.py)."""
    http: str | type[asyncio.Protocol] = "httptools"
    if running is not None:
        http = edge_protocol(lambda: running().client_timeout, running, connections)
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        lifespan="off",
        loop="uvloop",
        http=http,
        proxy_headers=False,  # client IPs come from identity.trusted_proxies only
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        # the drain already waited shutdown_grace and the app answered what was left (GatewayApp.cut):
        # a backstop; the app takes a cancellation then for a cut too, never a 500
        timeout_graceful_shutdown=1,
        timeout_keep_alive=config.client_keep_alive,  # type: ignore[arg-type]  # typed int; used as a float delay
    )


class Worker:
    def __init__(self, config: Config, options: ServeOptions) -> None:
        self.options = options
        self.state = GatewayState.create(config)
        # max_client_connections when unset: what this process's open-file limit leaves
        self.default_connections = default_total(open_file_limit(), config.upstream.max_connections)

        def running() -> Config:
            return self.state.routing.config

        self.access_log = AccessLog()
        dropped = self.state.metrics.log_lines_dropped
        log_writer.count_drops(lambda stream, lines: dropped.labels(stream).inc(lines))
        self.connection_guards = (
            self._connection_guard("public", limits_following(running, self.default_connections)),
            self._connection_guard("admin", lambda: ADMIN_LIMITS),
        )
        self.app = GatewayApp(self.state, self.access_log)
        self.public = SignalFreeServer(uvicorn_config(
            self.app, config, public=True, running=running,
            connections=self.connection_guards[0]))
        self.admin = SignalFreeServer(uvicorn_config(
            create_admin_app(self.state), config, public=False, running=running,
            connections=self.connection_guards[1]))
        self._stopping = False
        self._public_task: asyncio.Future[None] | None = None
        self.reloader = Reloader(self.state, options.config_path, options.overrides)

    def _connection_guard(self, port: str, limits: Callable[[], ConnectionLimits]) -> ConnectionGuard:
        metrics = self.state.metrics
        refused = {limit: metrics.connections_refused.labels(port, limit) for limit in CONNECTION_LIMITS}
        return ConnectionGuard(
            limits, name=port, on_refused=lambda limit: refused[limit].inc(),
            on_open=metrics.client_connections.inc if port == "public" else None,
        )

    async def run(self, public_sock: socket.socket, admin_sock: socket.socket,
                  on_serving: Callable[[], None] | None = None) -> None:
        """Serve until stopped; `on_serving` is called once both servers have started."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.state.open()
        except Exception as exc:  # (a StoreError is not raised: on_error decides while the store is down)
            raise ServeError(f"could not open the store {redact(self.state.routing.config.store.url)}: "
                             f"{_one_line(exc)}") from exc
        settle_heap()  # what startup built lives as long as the worker: out of the collector's way
        watcher = asyncio.ensure_future(watch_file(self.reloader))
        serving = asyncio.ensure_future(self._tell_when_serving(on_serving))
        try:
            self._public_task = asyncio.ensure_future(self.public.serve([public_sock]))
            await asyncio.gather(self._public_task, self.admin.serve([admin_sock]))
        finally:
            serving.cancel()
            watcher.cancel()
            await self.reloader.aclose()
            self.access_log.flush()  # the last requests' lines, before anything else can fail
            for guard in self.connection_guards:
                guard.flush_log(loop)  # refusals of the last period, whose summary was not due yet
            self.state.metrics.flush()  # and their metric updates (multiprocess files outlive the worker)
            await self.state.aclose()
            log_writer.drain()  # what the writer threads hold, boundedly (a stalled reader cannot hold the exit)

    async def _tell_when_serving(self, on_serving: Callable[[], None] | None) -> None:
        while not (self.public.started and self.admin.started):
            await asyncio.sleep(0.01)
        if on_serving is not None:
            on_serving()

    def stop(self) -> None:
        if not self._stopping:  # repeated signals (Ctrl+C reaches every worker too) change nothing
            self._stopping = True
            asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        self.state.draining = True
        grace = self.state.routing.config.shutdown_grace
        # Not only the admitted: a request reading its body or waiting for a slot was accepted
        # before the signal and is owed an answer as much (it may still be admitted meanwhile).
        in_progress = self.app.in_progress
        log.info("draining: %d request(s) in progress (%d admitted), grace %.1fs",
                 len(in_progress), self.state.active_requests, grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while in_progress and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if in_progress:
            # Answered by the app (503 shutting_down, or cut mid-body), not by uvicorn's
            # cancellation, which would answer a plain 500 and log a traceback for each.
            log.warning("shutdown_grace over: cutting %d request(s)", self.app.cut())
            cut_by = loop.time() + 1  # a few loop turns each; bounded all the same
            while in_progress and loop.time() < cut_by:
                await asyncio.sleep(0.01)
        self.public.should_exit = True
        # the admin port keeps answering (/readyz 503) until the public side has stopped
        if self._public_task is not None:
            await asyncio.wait([self._public_task])
        self.admin.should_exit = True

    def reload(self) -> None:
        self.reloader.request()  # parsed off the event loop (gateway.reload)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _run_worker(options: ServeOptions, public_sock: socket.socket, admin_sock: socket.socket,
                on_serving: Callable[[], None] | None = None) -> None:
    """Run one worker until it stops. ServeError (or ConfigError, if the file changed since the
    parent read it): it could not start."""
    configure_logging()
    config = load_config(options.config_path, options.overrides)
    worker = _open_worker(config, options)
    import uvloop

    uvloop.run(worker.run(public_sock, admin_sock, on_serving))


def _open_worker(config: Config, options: ServeOptions) -> Worker:
    """The worker and its store, or one line saying why not (never a traceback: the config
    loader checks the store URL as the store parses it, so this is a backstop)."""
    try:
        return Worker(config, options)
    except StoreUrlError as exc:
        raise ServeError(f"store.url {quote(redact(config.store.url))} {exc}") from exc
    except Exception as exc:
        raise ServeError(f"could not start a worker (store.url {redact(config.store.url)}): {_one_line(exc)}") from exc


def _worker_process(options: ServeOptions, public_sock: socket.socket, admin_sock: socket.socket,
                    serving: multiprocessing.synchronize.Event) -> None:
    """A supervised worker's process: a failure to start is one log line and exit 1.
    `serving` (a multiprocessing Event) is set once it serves."""
    try:
        _run_worker(options, public_sock, admin_sock, serving.set)
    except ConfigError as exc:
        _exit_unstarted(f"invalid config: {exc.problems[0]}")
    except ServeError as exc:
        _exit_unstarted(str(exc))


def _exit_unstarted(reason: str) -> None:
    log.error("%s (worker %d)", reason, os.getpid())
    log_writer.drain()  # (the line is written by a thread: before the process ends)
    sys.exit(1)


def serve(options: ServeOptions) -> int:
    """Run until stopped; returns the exit code. Raises ConfigError / ServeError before starting."""
    config = load_config(options.config_path, options.overrides)
    if options.workers < 1:
        raise ServeError("--workers must be at least 1")
    if options.workers > 1 and config.store.url.startswith("memory://"):
        raise ServeError(
            f"--workers {options.workers} with store.url memory:// would give every worker its own limits; "
            "use a Redis store.url to share limits between workers, or --workers 1"
        )
    open_files = raise_open_file_limit()  # before the workers start: they inherit it
    public_sock = bind(config.listen)
    admin_sock = bind(config.admin_listen)
    configure_logging()
    log.info("listening on %s (admin %s), %d worker(s), pid %d",
             _address(public_sock), _address(admin_sock), options.workers, os.getpid())
    _log_connection_limits(config, open_files)
    if options.workers == 1:
        _run_worker(options, public_sock, admin_sock)
        code = 0
    else:
        code = _supervise(options, public_sock, admin_sock)
    log.info("stopped (exit code %d)", code)
    log_writer.drain()
    return code


def _log_connection_limits(config: Config, open_files: int) -> None:
    allowed = default_total(open_files, config.upstream.max_connections)
    total = config.max_client_connections or allowed
    log.info("client connections per worker: at most %d in all%s, %d per client address (open-file limit %d)",
             total, "" if config.max_client_connections else " (max_client_connections unset: what the "
             "open-file limit leaves)", config.max_connections_per_client or default_per_client(config), open_files)
    if total > allowed:
        log.warning("max_client_connections %d is more than the open-file limit %d leaves for clients (%d): "
                    "past that, connections fail at the accept instead of getting a 503, and the gateway's "
                    "own upstream and store connections with them", total, open_files, allowed)


def _address(sock: socket.socket) -> str:
    """The bound address as a URL (the real port when 0 was asked for)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _supervise(options: ServeOptions, public_sock: socket.socket, admin_sock: socket.socket) -> int:
    """N worker processes on the shared sockets; signals are passed on; a worker that crashes
    after it served is replaced. One that exits before it served (its store cannot be opened,
    the config changed under it) stops the gateway with exit code 1: its replacement would fail
    the same way, for ever. Metrics aggregate through a fresh multiprocess directory."""
    configure_logging()
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")

    def start() -> tuple[multiprocessing.process.BaseProcess, multiprocessing.synchronize.Event]:
        serving = context.Event()  # set by the worker once its servers have started
        process = context.Process(target=_worker_process, args=(options, public_sock, admin_sock, serving),
                                  daemon=False)
        process.start()
        return process, serving

    started = [start() for _ in range(options.workers)]
    workers = [process for process, _ in started]
    serving = [event for _, event in started]
    stopping = False
    failed_to_start = False

    def signal_workers(signum: int) -> None:
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    def forward_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        signal_workers(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward_signal)
    from prometheus_client.multiprocess import mark_process_dead

    try:
        while True:
            for i, process in enumerate(workers):
                process.join(timeout=0.2)
                if process.exitcode is not None and not stopping:
                    # its live gauges (in-flight, banned IPs) must not linger in the sum
                    mark_process_dead(process.pid, metrics_dir)
                    if not serving[i].is_set():
                        log.error("worker %d exited with %s before it served; stopping the gateway",
                                  process.pid, process.exitcode)
                        stopping = failed_to_start = True
                        signal_workers(signal.SIGTERM)
                        continue
                    log.error("worker %d exited with %s; starting a new one", process.pid, process.exitcode)
                    workers[i], serving[i] = start()
            if stopping and all(p.exitcode is not None for p in workers):
                break
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    # a worker still starting when the stop signal came dies of it before installing its
    # handlers: that is a clean stop too
    clean = (0, -signal.SIGTERM, -signal.SIGINT)
    return 0 if not failed_to_start and all(p.exitcode in clean for p in workers) else 1


def main_serve(options: ServeOptions) -> int:
    try:
        return serve(options)
    except ConfigError as exc:
        print(f"gateway: invalid config: {exc.problems[0]}" + (
            f" (and {len(exc.problems) - 1} more problem(s); run gateway check-config)" if len(exc.problems) > 1 else ""
        ), file=sys.stderr)
        return 1
    except ServeError as exc:
        log_writer.drain()  # what was logged before (a worker that could not start: "listening on")
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
