"""Logging set-up: plain lines to stderr, and no traceback for aborts we cause on purpose.

Nothing secret is ever passed to a logger: keys are identified by their public id only.
"""

from __future__ import annotations

import logging
import sys


class _DropIntentionalAborts(logging.Filter):
    """uvicorn logs any exception escaping the app as a crash. The forwarder raises one on
    purpose to abort a client connection when the upstream broke mid-body; that is an
    expected event (counted in metrics), not a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        from gateway.proxy.forwarder import ClientAborted

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ClientAborted)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropIntentionalAborts())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):  # httpx logs full URLs (query strings may hold keys)
        logging.getLogger(noisy).setLevel(logging.WARNING)
