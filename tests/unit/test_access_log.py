"""The access log (gateway/accesslog.py): one JSON line per request with the documented fields,
strings escaped as json.dumps escapes them, lines of one loop iteration written together."""

from __future__ import annotations

import asyncio
import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.accesslog import AccessLog, format_line
from gateway.asgi import Scope

FIELDS = ["time", "key", "plan", "route", "method", "path", "status", "outcome", "admission_ms", "upstream_ms",
          "client"]


def scope(path: str = "/v1/chat", method: str = "POST") -> Scope:
    return {"type": "http", "method": method, "path": path, "client": ("10.0.0.7", 41000), "headers": []}


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("stdout is gone")


def test_a_line_has_every_field_in_order_with_its_value() -> None:
    line = format_line(scope(), 200, "admitted", "alice", "pro", "/v1/**", 0.0012345, 0.25, None, 1_700_000_000.1234)
    record = json.loads(line)
    assert list(record) == FIELDS
    assert record == {
        "time": 1_700_000_000.123, "key": "alice", "plan": "pro", "route": "/v1/**", "method": "POST",
        "path": "/v1/chat", "status": 200, "outcome": "admitted", "admission_ms": 1.234, "upstream_ms": 250.0,
        "client": None,
    }
    assert " " not in line and "\n" not in line  # compact, one line


def test_missing_values_are_null() -> None:
    record = json.loads(format_line(scope(), 401, "unauthorized", None, "-", "-", None, None, None, 1.0))
    assert record["key"] is None and record["admission_ms"] is None and record["upstream_ms"] is None


def test_client_controlled_strings_are_escaped_like_json_dumps() -> None:
    path = '/v1/"quoted"\\back\nline\u00e9\u2028\x00/\U0001f600'
    line = format_line(scope(path, "GET"), 404, "no_route", "k", "p", "-", None, None, "::1", 1.0)
    assert f'"path":{json.dumps(path)}' in line  # json.dumps' own ASCII escaping, byte for byte
    assert json.loads(line)["path"] == path


def test_lines_of_one_loop_iteration_are_written_with_one_write() -> None:
    stream = CountingStream()
    log = AccessLog(stream)

    async def requests() -> tuple[str, int]:
        for status in (200, 429, 401):
            log.write(scope(), status, "admitted", "k", "p", "/v1/**", 0.001, None)
        before = stream.getvalue()  # nothing yet: the flush is scheduled for this iteration's end
        await asyncio.sleep(0)
        return before, stream.writes

    before, writes = asyncio.run(requests())
    assert before == "" and writes == 1
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and [json.loads(line)["status"] for line in lines[:-1]] == [200, 429, 401]
    assert [json.loads(line)["client"] for line in lines[:-1]] == ["10.0.0.7"] * 3  # the socket peer


def test_flush_writes_what_is_pending_at_once() -> None:
    stream = io.StringIO()
    log = AccessLog(stream)

    async def request() -> str:
        log.write(scope(), 200, "admitted", "k", "p", "/v1/**", None, None, client="203.0.113.9")
        log.flush()  # as on shutdown: no loop iteration needed
        return stream.getvalue()

    written = asyncio.run(request())
    assert json.loads(written)["client"] == "203.0.113.9" and written.endswith("\n")
    log.flush()
    assert stream.getvalue() == written  # nothing is written twice


def test_without_an_event_loop_each_line_is_written_at_once() -> None:
    stream = io.StringIO()
    AccessLog(stream).write(scope(), 200, "admitted", "k", "p", "/v1/**", None, None)
    assert json.loads(stream.getvalue())["status"] == 200


def test_a_broken_stdout_never_fails_a_request() -> None:
    log = AccessLog(BrokenStream())

    async def requests() -> None:
        log.write(scope(), 200, "admitted", "k", "p", "/v1/**", None, None)
        await asyncio.sleep(0)  # the scheduled flush meets the broken stream
        log.write(scope(), 200, "admitted", "k", "p", "/v1/**", None, None)
        log.flush()

    asyncio.run(requests())  # no exception


def _reference_line(scope: Scope, status: int, outcome: str, key_id: str | None, plan: str, route: str,
                    admission_s: float | None, upstream_s: float | None, client: str | None, now: float) -> str:
    """The line as the earlier helper-per-field version of format_line built it."""
    def string(value: str | None) -> str:
        return "null" if value is None else json.dumps(value)

    def milliseconds(seconds: float | None) -> str:
        return "null" if seconds is None else "%.3f" % (seconds * 1000)

    return (
        f'{{"time":{now:.3f},"key":{string(key_id)},"plan":{json.dumps(plan)},"route":{json.dumps(route)},'
        f'"method":{string(scope.get("method"))},"path":{string(scope.get("path"))},"status":{status:d},'
        f'"outcome":{json.dumps(outcome)},"admission_ms":{milliseconds(admission_s)},'
        f'"upstream_ms":{milliseconds(upstream_s)},"client":{string(client)}}}'
    )


_TEXT = st.text(max_size=12)
_SECONDS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 100))


@settings(max_examples=300)
@given(st.one_of(st.none(), _TEXT), st.one_of(st.none(), _TEXT), st.integers(100, 599), _TEXT,
       st.one_of(st.none(), _TEXT), _TEXT, _TEXT, _SECONDS, _SECONDS, st.one_of(st.none(), _TEXT),
       st.floats(0, 4e9))
def test_the_line_is_byte_for_byte_the_reference(
    method: str | None, path: str | None, status: int, outcome: str, key_id: str | None, plan: str, route: str,
    admission_s: float | None, upstream_s: float | None, client: str | None, now: float,
) -> None:
    request: Scope = {"type": "http", "headers": []}
    if method is not None:
        request["method"] = method
    if path is not None:
        request["path"] = path
    args = (request, status, outcome, key_id, plan, route, admission_s, upstream_s, client, now)
    assert format_line(*args) == _reference_line(*args)
