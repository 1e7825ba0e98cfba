"""Logging set-up: plain lines to stderr (off the event loop), and no traceback for aborts we cause on purpose.

Nothing secret is ever passed to a logger: keys are identified by their public id only.
"""

from __future__ import annotations

import logging

from gateway import log_writer
from gateway.proxy.forwarder import ClientAbortedLogFilter

# uvicorn's lifecycle lines, logged once per server: a worker runs two (public and admin), so
# each would appear twice; the gateway says where it listens and when it stopped itself.
_UVICORN_LIFECYCLE = frozenset({
    "Started server process [%d]", "Waiting for application startup.", "Application startup complete.",
    "Shutting down", "Waiting for application shutdown.", "Application shutdown complete.",
    "Finished server process [%d]",
})


def _not_uvicorn_lifecycle(record: logging.LogRecord) -> bool:
    return not (record.name == "uvicorn.error" and record.msg in _UVICORN_LIFECYCLE)


def configure_logging(level: int = logging.INFO) -> None:
    # stderr written by a thread of its own: a stalled reader costs lines, never the event loop
    handler = logging.StreamHandler(log_writer.stderr())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # uvicorn logs any exception escaping the app as a crash; the forwarder's deliberate abort
    # of a response whose upstream broke mid-body is an expected, counted event.
    handler.addFilter(ClientAbortedLogFilter())
    handler.addFilter(_not_uvicorn_lifecycle)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):  # httpx logs full URLs (query strings may hold keys)
        logging.getLogger(noisy).setLevel(logging.WARNING)
