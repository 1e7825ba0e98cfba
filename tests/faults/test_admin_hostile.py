"""The admin port against hostile clients, on real `gateway serve` processes (memory store,
no `admin_token`: the loopback setup a web page in the operator's browser can reach).

What must hold: a page on another site changes nothing (quota, jobs, bans), scripts still do;
a body that never arrives is cut after `client_timeout` with 408, so stalled bodies cannot
hold the admin port's 128 connections and starve the probes; a client leaving mid-body writes
no traceback; `DELETE /v1/bans/{ip}` lifts exactly the group it names or answers 400; `done`
calls for ids that cannot be jobs cost no memory. (The in-process half of these rules, with
their tables, is tests/unit/test_admin_requests.py.)
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.connection_limits import ADMIN_CONNECTIONS
from tests.faults.conftest import SLACK, fault_config, gateway_for
from tests.support.processes import Proc

pytestmark = pytest.mark.e2e

CLIENT_TIMEOUT = 1.0
QUOTA_PLANS = {
    "big": {"limits": {"rpm": {"rate": "100000/1m"}, "daily": {"quota": "1000/1d"}}},
    "small": {"limits": {"rpm": {"rate": "100000/1m"}, "daily": {"quota": "50/1d"}}},
}


def admin_config(upstream: str, **extra: Any) -> dict[str, Any]:
    return fault_config(upstream, "memory://", client_timeout=f"{int(CLIENT_TIMEOUT * 1000)}ms", plans=QUOTA_PLANS,
                        routes=[{"path": "/v1/**", "limits": ["rpm", "daily"]}], **extra)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def raw(proc: Proc, request: bytes, opened: list[socket.socket], timeout: float = 5) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proc.admin_port), timeout=timeout)
    opened.append(sock)
    sock.sendall(request.replace(b"{PORT}", str(proc.admin_port).encode()))
    return sock


def answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """The answer on `sock`: status, headers, body, and whether the gateway then closed it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, b"", True
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    return int(lines[0].split()[1]), headers, body, closed


def granted(proc: Proc, key: str = "small") -> int:
    view = httpx.get(f"{proc.admin_url}/v1/keys/{key}", timeout=5).json()
    (bucket,) = [b for b in view["buckets"] if b["kind"] == "quota"]
    return int(bucket["granted"])


CROSS_SITE = (b"POST /v1/keys/small/quota HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nOrigin: https://evil.example\r\n"
              b"Referer: https://evil.example/\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\n"
              b"Content-Type: text/plain;charset=UTF-8\r\nContent-Length: %d\r\n\r\n%s")


def test_a_page_on_another_site_changes_nothing_and_scripts_still_do(
    tmp_path: Path, upstream: str, sockets: list[socket.socket]
) -> None:
    with gateway_for(tmp_path, admin_config(upstream)) as proc:
        for body in (b'{"grant": 1000000000}', b'{"reset": true}'):
            status, headers, text, closed = answer(raw(proc, CROSS_SITE % (len(body), body), sockets))
            assert (status, json.loads(text).get("error"), closed) == (403, "cross_origin_request", True)
            assert headers["content-type"] == "application/json"
        # the same body without Origin (an old browser, a form): a preflight-free content type
        plain = (b"POST /v1/keys/small/quota HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 21\r\n\r\n{\"grant\": 1000000000}")
        status, _, text, _ = answer(raw(proc, plain, sockets))
        assert (status, json.loads(text)["error"]) == (415, "unsupported_media_type")
        done = b"POST /v1/jobs/j1/done HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nOrigin: https://evil.example\r\n\r\n"
        assert answer(raw(proc, done, sockets))[0] == 403
        lift = b"DELETE /v1/bans/127.0.0.1 HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nOrigin: null\r\n\r\n"
        assert answer(raw(proc, lift, sockets))[0] == 403
        # an encoded slash is no separator: this is not the quota route of key small
        encoded = httpx.post(f"{proc.admin_url}/v1/keys/small%2Fquota", json={"grant": 5}, timeout=5)
        assert (encoded.status_code, encoded.json()["error"]) == (405, "method_not_allowed")
        assert granted(proc) == 0
        # curl and scripts send no Origin; the admin port's own page is same-origin
        assert httpx.post(f"{proc.admin_url}/v1/keys/small/quota", json={"grant": 3}, timeout=5).status_code == 200
        same = {"Origin": proc.admin_url, "Sec-Fetch-Site": "same-origin"}
        assert httpx.post(f"{proc.admin_url}/v1/keys/small/quota", json={"grant": 4}, headers=same,
                          timeout=5).status_code == 200
        assert granted(proc) == 7
        trailing = httpx.get(f"{proc.admin_url}/metrics/", timeout=5)
        assert (trailing.status_code, trailing.json()["error"]) == (404, "not_found")


def test_stalled_admin_bodies_get_408_and_the_probes_keep_answering(
    tmp_path: Path, upstream: str, sockets: list[socket.socket]
) -> None:
    stalled = (b"POST /v1/keys/small/quota HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nContent-Type: application/json\r\n"
               b"Content-Length: 100\r\n\r\n")
    timeout = CLIENT_TIMEOUT + 3 + SLACK
    with gateway_for(tmp_path, admin_config(upstream)) as proc:
        # a client leaving mid-body: no traceback (gateway_for checks the log)
        raw(proc, stalled + b'{"grant"', sockets).close()
        started = time.monotonic()
        held = [raw(proc, stalled, sockets, timeout=timeout) for _ in range(ADMIN_CONNECTIONS)]
        for sock in held:
            status, headers, body, closed = answer(sock)
            assert (status, json.loads(body)["error"], closed) == (408, "request_timeout", True)
            assert headers["content-type"] == "application/json"
        assert time.monotonic() - started < CLIENT_TIMEOUT + 2 + SLACK
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(proc.admin_url + path, timeout=5).status_code == 200
        assert granted(proc) == 0
    assert "ClientDisconnect" not in proc.log()


def _strike_until_banned(proc: Proc, client_ip: str) -> None:
    with httpx.Client(timeout=5) as http:
        for _ in range(12):
            answer = http.get(proc.url + "/v1/x", headers={"X-Forwarded-For": client_ip, "X-API-Key": "wrong"})
            if answer.status_code == 403:
                return
    pytest.fail(f"{client_ip} not banned")


def _banned(proc: Proc) -> set[str]:
    return {entry["ip"] for entry in httpx.get(proc.admin_url + "/v1/bans", timeout=5).json()}


def test_a_ban_lift_names_exactly_one_group(tmp_path: Path, upstream: str) -> None:
    config = admin_config(upstream, identity={"trusted_proxies": ["127.0.0.1/32"]},
                          bans={"strikes": 3, "within": "10s", "duration": "60s", "ipv6_prefix": 64})
    with gateway_for(tmp_path, config) as proc:
        for client_ip in ("203.0.113.0", "2001:db8:a::1"):
            _strike_until_banned(proc, client_ip)
        assert _banned(proc) == {"203.0.113.0", "2001:db8:a::/64"}

        def lift(group: str) -> httpx.Response:
            return httpx.delete(f"{proc.admin_url}/v1/bans/{group}", timeout=5)

        # each was read as another group: 203.0.113.0, 2001:db8:a::/64 (the /48's first /64), ::/64
        for other in ("203.0.113.7/24", "2001:db8:a:b::/48", "2001:db8::/0", "203.0.113.0/32"):
            refused = lift(other)
            assert (refused.status_code, refused.json().get("error")) == (400, "bad_ip"), other
        assert _banned(proc) == {"203.0.113.0", "2001:db8:a::/64"}
        assert lift("2001:db8:a::%2F64").json() == {"success": True, "ip": "2001:db8:a::/64", "lifted": True}
        assert lift("203.0.113.0").status_code == 200
        assert _banned(proc) == set()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_done_calls_for_ids_that_cannot_be_jobs_cost_no_memory(tmp_path: Path, upstream: str) -> None:
    with gateway_for(tmp_path, admin_config(upstream)) as proc, httpx.Client(timeout=5) as http:
        def done(job_id: str) -> httpx.Response:
            return http.post(f"{proc.admin_url}/v1/jobs/{job_id}/done")

        for n in range(200):  # warm up: allocator and caches
            done(f"{n:05d}" + "x" * 15_000)
        before = _rss_mib(proc.process.pid)
        for n in range(3000):  # was +43 MiB: a 15 KB tombstone each, kept 600 s
            answered = done(f"{n:05d}" + "x" * 15_000)
            assert (answered.status_code, answered.json()["error"]) == (404, "unknown_job")
        assert _rss_mib(proc.process.pid) - before < 8
        assert len(answered.content) < 1000
