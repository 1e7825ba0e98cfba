"""Log output written off the event loop: one thread per stream, a bounded backlog, drops counted.

A stream's reader can stop reading: a pipe nobody drains, docker's (blocking) log driver while
its backend stalls, a terminal paused with Ctrl+S. A write then blocks until the reader takes
more, and it blocked the event loop with it: a stdout nobody read froze the gateway after 353
requests (64 KiB of pipe), public and admin ports alike, `/healthz` included. Here a write only
appends to a queue (`SimpleQueue.put`, in C) and a daemon thread does the blocking writes. Past
`MAX_BACKLOG` characters waiting, new text is dropped: counted for the metrics
(`on_dropped`) and reported in a warning once the stream takes writes again. So a stalled
reader costs log lines, never requests.

The access log and the gateway's own log (stderr) each write through one (`stdout()`,
`stderr()`); `drain()` waits, boundedly, for what is queued (a worker's shutdown).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

MAX_BACKLOG = 8 * 1024 * 1024  # characters queued and not yet written, per stream


class BackgroundStream:
    """A text stream whose `write` never blocks (see the module's doc)."""

    def __init__(self, stream: IO[str], name: str, max_backlog: int = MAX_BACKLOG,
                 on_dropped: Callable[[str, int], None] | None = None) -> None:
        self.name = name
        self.on_dropped = on_dropped  # (stream name, lines): called where the drop happens
        self._stream = stream
        self._max_backlog = max_backlog
        self._queue: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()  # text, or a drain's marker
        # Each counter has one writer: `_queued` and `dropped` the callers (the event loop, or a
        # logging call under the GIL), `_written` and `_noted` the thread.
        self._queued = 0
        self._written = 0
        self.dropped = 0  # lines dropped in all
        self._noted = 0  # of them, reported in a warning already
        self._thread = threading.Thread(target=self._run, name=f"log-writer-{name}", daemon=True)
        self._thread.start()

    def write(self, text: str) -> int:
        size = len(text)
        if self._queued - self._written + size > self._max_backlog:
            lines = text.count("\n") or 1
            self.dropped += lines
            if self.on_dropped is not None:
                self.on_dropped(self.name, lines)
            return size
        self._queued += size
        self._queue.put(text)
        return size

    def flush(self) -> None:
        """Nothing to do here: the thread flushes after each write (see `drain`)."""

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for everything queued so far to be written; True if it
        was. The wait is on a marker the thread sets once it has written what came before it,
        never on a clock of ours (under libfaketime `time.sleep` itself can fail)."""
        marker = threading.Event()
        self._queue.put(marker)
        try:
            return marker.wait(timeout)
        except OSError:  # a clock that misbehaves must not fail the exit
            return False

    def _run(self) -> None:
        get, empty = self._queue.get, self._queue.empty
        while True:
            parts: list[str] = []
            markers: list[threading.Event] = []
            item = get()
            while True:  # what queued up meanwhile goes in the same write
                if isinstance(item, str):
                    parts.append(item)
                else:
                    markers.append(item)
                if empty() or len(parts) >= 1024:
                    break
                item = get()
            if parts:
                self._write("".join(parts))
            for marker in markers:
                marker.set()

    def _write(self, chunk: str) -> None:
        try:
            self._stream.write(chunk)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the text is gone, the gateway goes on
            pass
        self._written += len(chunk)
        if self.dropped != self._noted:
            self._note(self.dropped)

    def _note(self, dropped: int) -> None:
        lines, self._noted = dropped - self._noted, dropped
        note = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING gateway.log: {lines} line(s) of {self.name} "
                "were dropped: its reader took no writes for a while\n")
        if self.name != "stderr":
            stderr().write(note)
            return
        try:  # this thread's own stream, which has just taken a write
            self._stream.write(note)
        except (OSError, ValueError):
            pass


_streams: dict[str, BackgroundStream] = {}
_lock = threading.Lock()


def _background(name: str, stream: IO[str]) -> BackgroundStream:
    with _lock:
        made = _streams.get(name)
        if made is None:
            made = _streams[name] = BackgroundStream(stream, name)
        return made


def stdout() -> BackgroundStream:
    """The process's stdout (the access log), written off the event loop."""
    return _background("stdout", sys.stdout)


def stderr() -> BackgroundStream:
    """The process's stderr (the gateway's log), written off the event loop."""
    return _background("stderr", sys.stderr)


def count_drops(on_dropped: Callable[[str, int], None]) -> None:
    """Report every stream's dropped lines to `on_dropped` (the metrics) from now on."""
    for stream in (stdout(), stderr()):
        stream.on_dropped = on_dropped


def drain(timeout: float = 2.0) -> None:
    """Wait (up to `timeout` each) for what the streams have queued to be written."""
    for stream in list(_streams.values()):
        stream.drain(timeout)
