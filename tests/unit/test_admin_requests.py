"""What the admin port takes from a request (the admin app in process, memory store): no state
change from another origin's page, JSON bodies only and parsed strictly, a job id bounded
before the store sees it, ban groups named exactly, and paths routed as the client wrote them.
The end-to-end halves (real processes, raw sockets) are in tests/faults/test_admin_hostile.py."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.admin import create_admin_app
from gateway.admin.cross_site import refusal, same_origin
from gateway.admission.bans import parse_group
from gateway.config.loader import load_config_text
from gateway.state import GatewayState
from gateway.store.jobs import MAX_JOB_ID
from gateway.store.memory_jobs import MAX_TOMBSTONES, MemoryJobBook
from tests.support.config_texts import minimal_config

CONFIG = minimal_config("daily: {quota: 50/1d}", routes="  - path: /v1/**\n    limits: [daily]\n")
QUOTA = "/v1/keys/alice/quota"
JSON = {"Content-Type": "application/json"}


def call(method: str, path: str, state: GatewayState | None = None, **kwargs: Any) -> httpx.Response:
    async def run() -> httpx.Response:
        app = create_admin_app(state or GatewayState.create(load_config_text(CONFIG, "t.yaml")))
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9464") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


def granted(state: GatewayState) -> int:
    (bucket,) = [b for b in call("GET", "/v1/keys/alice", state).json()["buckets"] if b["kind"] == "quota"]
    return int(bucket["granted"])


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"success": False, "error": error, "message": response.json()["message"]}


# -- CSRF: another origin's page changes nothing ---------------------------------------------------


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://127.0.0.1:9464", "127.0.0.1:9464", True),
    ("HTTP://LocalHost:9464", "localhost:9464", True),
    ("http://[::1]:9464", "[::1]:9464", True),
    ("http://admin.internal", "admin.internal", True),
    ("https://admin.internal", "admin.internal", True),  # a TLS proxy in front, Host passed through
    ("http://admin.internal:80", "admin.internal", True),
    ("https://evil.example", "127.0.0.1:9464", False),
    ("http://127.0.0.1", "127.0.0.1:9464", False),  # a page on port 80 of the same machine
    ("http://127.0.0.1:8080", "127.0.0.1:9464", False),
    ("http://localhost:9464", "127.0.0.1:9464", False),  # another name: another origin
    ("https://admin.internal:8443", "admin.internal", False),
    ("null", "127.0.0.1:9464", False),  # a sandboxed frame or a file: page
    ("ftp://127.0.0.1:9464", "127.0.0.1:9464", False),
    ("http://127.0.0.1:9464/x", "127.0.0.1:9464", False),
    ("http://user@127.0.0.1:9464", "127.0.0.1:9464", False),
    ("http://127.0.0.1:9464", None, False),
])
def test_same_origin(origin: str, host: str | None, same: bool) -> None:
    assert same_origin(origin, host) is same


@pytest.mark.parametrize(("method", "headers", "expected"), [
    ("POST", [(b"origin", b"https://evil.example")], "cross_origin"),
    ("DELETE", [(b"origin", b"https://evil.example")], "cross_origin"),
    ("OPTIONS", [(b"origin", b"https://evil.example")], "cross_origin"),  # a preflight: never granted
    ("POST", [(b"sec-fetch-site", b"cross-site")], "cross_origin"),
    ("POST", [(b"sec-fetch-site", b"same-site")], "cross_origin"),
    ("POST", [(b"sec-fetch-site", b"same-origin")], None),
    ("POST", [(b"sec-fetch-site", b"none")], None),  # typed in the address bar
    ("POST", [(b"origin", b"http://127.0.0.1:9464"), (b"origin", b"https://evil.example")], "cross_origin"),
    ("GET", [(b"origin", b"https://evil.example"), (b"sec-fetch-site", b"cross-site")], None),
    ("HEAD", [(b"origin", b"https://evil.example")], None),
    ("POST", [(b"content-length", b"5"), (b"content-type", b"text/plain;charset=UTF-8")], "not_json"),
    ("POST", [(b"content-length", b"5")], "not_json"),
    ("POST", [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/x-www-form-urlencoded")],
     "not_json"),
    ("POST", [(b"content-length", b"5"), (b"content-type", b"application/json; charset=utf-16")], "not_json"),
    ("POST", [(b"content-length", b"5"), (b"content-type", b"application/json"),
              (b"content-type", b"text/plain")], "not_json"),
    ("POST", [(b"content-length", b"5"), (b"content-type", b"Application/JSON; charset=\"UTF-8\"")], None),
    ("POST", [(b"content-length", b"0"), (b"content-type", b"text/plain")], None),  # no body: nothing to parse
    ("POST", [], None),  # curl -X POST .../done
])
def test_refusal(method: str, headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert refusal(method, [(b"host", b"127.0.0.1:9464"), *headers]) == expected


@pytest.mark.parametrize(("method", "path", "kwargs"), [
    # what a page on https://evil.example can send without a preflight (the probe's requests)
    ("POST", QUOTA, {"content": b'{"grant": 1000000000}', "headers": {
        "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain;charset=UTF-8"}}),
    ("POST", QUOTA, {"content": b'{"reset": true}', "headers": {"Origin": "https://evil.example",
                                                               "Content-Type": "text/plain"}}),
    ("POST", QUOTA, {"content": b'{"grant": 7}', "headers": {"Sec-Fetch-Site": "same-site", **JSON}}),
    ("POST", "/v1/jobs/some-job/done", {"headers": {"Origin": "https://evil.example"}}),
    ("DELETE", "/v1/bans/203.0.113.7", {"headers": {"Origin": "http://127.0.0.1:8080"}}),
    ("OPTIONS", QUOTA, {"headers": {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}}),
])
def test_a_state_change_from_another_origin_gets_403_and_changes_nothing(method: str, path: str,
                                                                          kwargs: dict[str, Any]) -> None:
    state = GatewayState.create(load_config_text(CONFIG, "t.yaml"))
    response = call(method, path, state, **kwargs)
    assert_error(response, 403, "cross_origin_request")
    assert response.headers["connection"] == "close"
    assert granted(state) == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=utf-16"])
def test_a_body_that_is_not_json_gets_415(content_type: str | None) -> None:
    state = GatewayState.create(load_config_text(CONFIG, "t.yaml"))
    headers = {"Content-Type": content_type} if content_type else {}
    assert_error(call("POST", QUOTA, state, content=b'{"grant": 5}', headers=headers), 415, "unsupported_media_type")
    assert granted(state) == 0


def test_scripts_and_the_admin_page_itself_still_work() -> None:
    state = GatewayState.create(load_config_text(CONFIG, "t.yaml"))
    assert call("POST", QUOTA, state, json={"grant": 5}).status_code == 200  # curl, httpx: no Origin
    same = {"Origin": "http://127.0.0.1:9464", "Sec-Fetch-Site": "same-origin"}
    assert call("POST", QUOTA, state, json={"grant": 2}, headers=same).status_code == 200
    assert call("GET", "/v1/keys/alice", state, headers={"Origin": "https://evil.example"}).status_code == 200
    assert granted(state) == 7
    assert_error(call("POST", "/v1/jobs/j1/done", state), 404, "unknown_job")  # no body, no Content-Type


# -- quota bodies: strict JSON ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"[" * 1024,  # was a RecursionError: a plain-text 500 with a traceback
    b'{"a":' * 150 + b"1" + b"}" * 150,
    b'{"grant": 1000000000, "grant": 1}',
    b'{"reset": false, "reset": true}',
    b'{"grant": 5, "limit": "daily", "limit": "other"}',
    b'{"grant": null, "reset": true}',
    b'{"grant": 5, "limit": null}',
    '{"grant": 5}'.encode("utf-16"),
    '{"grant": 5}'.encode("utf-16-le"),
    '{"grant": 5}'.encode("utf-32"),
    b'\xef\xbb\xbf{"grant": 5}',  # a UTF-8 byte-order mark
    b'{"grant": 5, "limit": "\xff"}',
    b'{"grant": NaN}',
    b"",
])
def test_a_bad_quota_body_gets_400_and_grants_nothing(body: bytes) -> None:
    state = GatewayState.create(load_config_text(CONFIG, "t.yaml"))
    assert_error(call("POST", QUOTA, state, content=body, headers=JSON), 400, "bad_request")
    assert granted(state) == 0


def test_an_oversized_quota_body_gets_413_without_being_read() -> None:
    response = call("POST", QUOTA, content=b'{"grant": 5, "pad": "' + b"x" * 2000 + b'"}', headers=JSON)
    assert_error(response, 413, "body_too_large")


# -- job ids: bounded before the store -------------------------------------------------------------


@pytest.mark.parametrize("job_id", ["x" * 15_000, "x" * (MAX_JOB_ID + 1), "a%01b", "a%7Fb"])
def test_a_job_id_that_cannot_be_one_is_unknown_without_a_store_call(job_id: str) -> None:
    state = GatewayState.create(load_config_text(CONFIG, "t.yaml"))
    ended: list[str] = []

    async def end(job: str, owner: str | None) -> None:
        ended.append(job)

    state.jobs.end = end  # type: ignore[method-assign]
    response = call("POST", f"/v1/jobs/{job_id}/done", state)
    assert_error(response, 404, "unknown_job")
    assert len(response.content) < 1000  # the message quotes at most MAX_JOB_ID characters of it
    assert ended == []
    call("POST", f"/v1/jobs/{'x' * MAX_JOB_ID}/done", state)
    assert ended == ["x" * MAX_JOB_ID]  # the longest id that can be one still reaches the store


def test_the_memory_stores_tombstones_are_bounded_in_count() -> None:
    book = MemoryJobBook()
    for n in range(MAX_TOMBSTONES + 500):
        assert book.take(f"unknown-{n}", None, now=float(n), tombstone_ms=600_000.0) is None
    assert len(book._tombstones) == MAX_TOMBSTONES
    # the oldest went first; the newest still stop a late handover
    assert "unknown-0" not in book._tombstones
    last = f"unknown-{MAX_TOMBSTONES + 499}"
    assert not book.index(last, "alice", "j:" + last, ("k",), expiry=1e12, now=float(MAX_TOMBSTONES + 500))
    # a tombstone reported again moves to the end: it is the newest
    book.take("unknown-600", "alice", now=float(MAX_TOMBSTONES + 600), tombstone_ms=600_000.0)
    assert list(book._tombstones)[-1] == "unknown-600"


# -- ban groups: exactly what GET /v1/bans lists ---------------------------------------------------


@pytest.mark.parametrize(("text", "prefix", "group"), [
    ("203.0.113.7", 64, "203.0.113.7"),
    ("2001:db8:a::99", 64, "2001:db8:a::/64"),
    ("2001:db8:a::/64", 64, "2001:db8:a::/64"),
    ("2001:db8:a::/48", 48, "2001:db8:a::/48"),
    ("2001:db8:a::1", 128, "2001:db8:a::1"),
    ("203.0.113.7/24", 64, None),  # was the ban on 203.0.113.0
    ("203.0.113.7/32", 64, None),  # an IPv4 group is listed as its address
    ("2001:db8:a:b::/48", 64, None),  # was a different /64 (2001:db8:a::/64)
    ("2001:db8::/0", 64, None),  # was ::/64
    ("2001:db8:a::/96", 64, None),
    ("2001:db8:a::/64", 48, None),
    ("2001:db8:a::/", 64, None),
])
def test_parse_group_takes_an_address_or_exactly_the_configured_prefix(text: str, prefix: int,
                                                                       group: str | None) -> None:
    assert parse_group(text, prefix) == group


# -- paths: as the client wrote them ---------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/metrics/"), ("GET", "/v1/keys/alice/"), ("GET", "/healthz/"), ("POST", "/v1/keys/alice/quota/"),
])
def test_a_trailing_slash_is_a_json_404_not_a_redirect(method: str, path: str) -> None:
    assert_error(call(method, path, json={"grant": 1}), 404, "not_found")


def test_an_encoded_slash_stays_inside_its_segment() -> None:
    state = GatewayState.create(load_config_text(CONFIG, "t.yaml"))
    # was the quota route of key alice: now the key view of a key named "alice/quota"
    assert_error(call("POST", "/v1/keys/alice%2Fquota", state, json={"grant": 5}), 405, "method_not_allowed")
    assert_error(call("GET", "/v1/keys/alice%2Fquota", state), 404, "unknown_key")
    assert call("GET", "/v1/keys/alice%2Fquota", state).json()["message"] == "No key with id 'alice/quota'."
    assert granted(state) == 0
    # an upstream job id with a slash can now be ended; %25 is a percent sign
    assert "'ops/1%2F'" in call("POST", "/v1/jobs/ops%2F1%252F/done", state).json()["message"]
    # the ban route takes its prefix's slash encoded or not
    for path in ("/v1/bans/2001:db8:a::%2F64", "/v1/bans/2001:db8:a::/64"):
        assert_error(call("DELETE", path, state), 404, "not_banned")
