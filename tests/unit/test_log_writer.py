"""Log output off the event loop (gateway/log_writer.py): a stream whose reader stops never
blocks a write; what waits is bounded, and drops are counted and reported."""

from __future__ import annotations

import io
import threading
import time

from gateway.log_writer import BackgroundStream


class GatedStream(io.StringIO):
    """A stream whose writes block until `gate` is set, as a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write(self, text: str) -> int:
        self.gate.wait()
        return super().write(text)


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(32, "Broken pipe")


def test_writes_return_at_once_while_the_reader_is_stalled_and_arrive_in_order_after() -> None:
    stream = GatedStream()
    background = BackgroundStream(stream, "stdout")
    started = time.monotonic()
    for n in range(1000):
        background.write(f"line {n}\n")
    assert time.monotonic() - started < 0.5  # nothing waited for the stalled stream
    assert not background.drain(0.1)  # it still holds them
    stream.gate.set()
    assert background.drain(5)
    assert stream.getvalue() == "".join(f"line {n}\n" for n in range(1000))
    assert background.dropped == 0


def test_past_the_backlog_lines_are_dropped_counted_and_reported_once_writes_resume() -> None:
    stream = GatedStream()
    drops: list[tuple[str, int]] = []
    background = BackgroundStream(stream, "stderr", max_backlog=100,
                                  on_dropped=lambda name, lines: drops.append((name, lines)))
    background.write("first\n")
    time.sleep(0.1)  # the thread has taken "first" and blocks on the stream with it
    background.write("a" * 60 + "\n")
    background.write("b" * 30 + "\nsecond line\n")  # over 100 waiting: both of its lines dropped
    background.write("c\n")
    assert background.dropped == 2 and drops == [("stderr", 2)]
    stream.gate.set()
    assert background.drain(5)
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if "WARNING" not in line] == ["first", "a" * 60, "c"]
    notes = [line for line in lines if "WARNING gateway.log: 2 line(s) of stderr were dropped" in line]
    assert len(notes) == 1  # reported once, right after the write that took again


def test_a_broken_stream_never_raises_to_the_writer_and_later_writes_go_on() -> None:
    background = BackgroundStream(BrokenStream(), "stdout")
    assert background.write("lost\n") == 5
    assert background.drain(5)
    assert background.write("also lost\n") == 10 and background.drain(5)
