"""One real `gateway serve` process (memory store) in front of the mock upstream: every SPEC §4
answer this gateway makes, streaming, disconnects and what reaches the upstream."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admission.identity import hash_key
from tests.support.mock_upstream import download_blocks, download_sha256
from tests.support.processes import ROOT, Proc, gateway, mock_upstream, wait_until_in_flight, write_config
from tests.support.redis_server import free_port
from tests.support.secrets import secret

pytestmark = pytest.mark.e2e

SECRET = secret("e2e")
OTHER = secret("e2e-other")


def base_config(upstream: str, client: str = "aiohttp", **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstream": {"url": upstream, "client": client, "timeout": "1s",
                     "set_headers": {"X-Upstream-Token": "up-token"}},
        "max_request_body": "1MB",
        "keys": [
            {"id": "k1", "sha256": hash_key(SECRET), "plan": "small"},
            {"id": "k2", "sha256": hash_key(OTHER), "plan": "big"},
        ],
        "plans": {
            "small": {"limits": {"rpm": {"rate": "3/1m"}, "requests": {"concurrency": 1}}},
            "big": {"limits": {"rpm": {"rate": "1000/1m"}, "requests": {"concurrency": 2}}},
        },
        "routes": [
            {"path": "/only-post", "methods": ["POST"], "limits": ["rpm"]},
            {"path": "/**", "limits": ["rpm", "requests"]},
        ],
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with mock_upstream() as url:
        yield url


@pytest.fixture(params=["aiohttp", "httpx"])
def client(request: pytest.FixtureRequest) -> str:
    """Both upstream clients pass the same end-to-end tests."""
    return str(request.param)


@pytest.fixture
def gw(tmp_path: Path, upstream: str, client: str) -> Iterator[Proc]:
    httpx.post(upstream + "/_reset")
    with gateway(write_config(tmp_path / "gw.yaml", base_config(upstream, client))) as proc:
        yield proc


def last_request(upstream: str, key: str) -> dict[str, Any]:
    return httpx.get(upstream + "/_stats").json()["keys"][key]["last"]


def assert_error(response: httpx.Response, status: int, error: str, retry_after: bool) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["success"] is False and body["error"] == error and body["message"]
    if retry_after:
        assert int(response.headers["retry-after"]) == body["retryAfterSeconds"] >= 1
    else:
        assert "retry-after" not in response.headers and "retryAfterSeconds" not in body
    return body


def test_unauthorized_and_no_route(gw: Proc, upstream: str) -> None:
    assert_error(httpx.get(gw.url + "/x"), 401, "missing_api_key", retry_after=False)
    assert_error(httpx.get(gw.url + "/x", headers={"X-API-Key": "wrong"}), 401, "invalid_api_key", False)
    assert_error(httpx.get(gw.url + "/x?apikey=wrong"), 401, "invalid_api_key", False)
    # /only-post takes POST only and /** comes after it; route order decides
    response = httpx.get(gw.url + "/only-post", headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 200
    # dot segments, raw or encoded: refused as traversal before any route is matched
    assert raw_status(gw.port, "/a/../b") == 400
    assert raw_status(gw.port, "/a/%2e%2e/b") == 400
    # absolute-form: the parser keeps only the path; it goes to the configured upstream
    assert raw_status(gw.port, "http://evil.example/b?q=1") == 200
    assert last_request(upstream, "k1")["path"] == "/b"


def raw_status(port: int, target: str) -> int:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-API-Key: {SECRET}\r\nConnection: close\r\n\r\n".encode())
        head = sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def test_rate_limited_answer(gw: Proc, upstream: str) -> None:
    for i in range(3):
        ok = httpx.get(gw.url + "/", headers={"X-API-Key": SECRET})
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-remaining"] == str(2 - i)
    refused = httpx.get(gw.url + "/", headers={"X-API-Key": SECRET})
    body = assert_error(refused, 429, "rate_limited", retry_after=True)
    assert body["message"] == "You have exceeded 3 requests per 1m on the small plan."
    assert 55 <= body["retryAfterSeconds"] <= 60
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert refused.headers["ratelimit"].startswith('"rpm";r=0;t=')
    t = int(refused.headers["ratelimit"].split("t=")[1].split(",")[0])
    assert int(refused.headers["retry-after"]) >= t
    assert httpx.get(upstream + "/_stats").json()["keys"]["k1"]["total"] == 3


def test_concurrency_limited_answer_and_slot_freed(gw: Proc, upstream: str) -> None:
    with httpx.Client(timeout=10) as client:
        holders = [  # other clients holding both slots of k2 for a while
            subprocess.Popen([sys.executable, "-c", f"import httpx; httpx.get('{gw.url}/hold?ms=3000', "
                              f"headers={{'X-API-Key': '{OTHER}'}}, timeout=10)"])
            for _ in range(2)
        ]
        try:
            wait_until_in_flight(upstream, "k2", 2)
            refused = client.get(gw.url + "/", headers={"X-API-Key": OTHER})
            body = assert_error(refused, 429, "concurrency_limited", retry_after=True)
            assert refused.headers["retry-after"] == "1"  # a slot can free any moment
            assert body["message"] == "All 2 concurrent request slots of the big plan are in use."
            assert refused.headers["concurrency-limit"] == "2"
            assert refused.headers["concurrency-remaining"] == "0"
            assert refused.headers["x-concurrent-current"] == "2"
        finally:
            for holder in holders:
                holder.wait(10)
        assert client.get(gw.url + "/", headers={"X-API-Key": OTHER}).status_code == 200


def test_body_too_large_before_admission(gw: Proc, upstream: str) -> None:
    response = httpx.post(gw.url + "/upload", headers={"X-API-Key": SECRET}, content=b"x" * (1024 * 1024 + 1))
    assert_error(response, 413, "body_too_large", retry_after=False)
    # chunked: no length up front
    response = httpx.post(gw.url + "/upload", headers={"X-API-Key": SECRET},
                          content=iter([b"x" * 600_000, b"y" * 600_000]))
    assert_error(response, 413, "body_too_large", retry_after=False)
    keys = httpx.get(upstream + "/_stats").json()["keys"]
    assert keys.get("k1", {}).get("completed", 0) == 0  # the upstream never completed either


def test_upstream_timeout_and_unavailable(tmp_path: Path, upstream: str, client: str) -> None:
    with gateway(write_config(tmp_path / "gw.yaml", base_config(upstream, client))) as gw:
        slow = httpx.get(gw.url + "/delay_headers?ms=3000", headers={"X-API-Key": OTHER}, timeout=10)
        assert_error(slow, 504, "upstream_timeout", retry_after=False)
        assert slow.headers["concurrency-limit"] == "2"  # limit headers on the gateway's own errors too
        broken = httpx.get(gw.url + "/invalid_headers", headers={"X-API-Key": OTHER})
        assert_error(broken, 502, "upstream_unavailable", retry_after=False)
        # slots were freed: both slots are usable again at once
        assert httpx.get(gw.url + "/", headers={"X-API-Key": OTHER}).headers["concurrency-remaining"] == "1"
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(write_config(tmp_path / "dead.yaml", base_config(dead, client))) as gw:
        assert_error(httpx.get(gw.url + "/", headers={"X-API-Key": OTHER}), 502, "upstream_unavailable", False)


def test_what_reaches_the_upstream(gw: Proc, upstream: str) -> None:
    response = httpx.get(
        gw.url + "/echo?a=1&apikey=" + SECRET + "&b=2",
        headers={
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "1",
            "X-Forwarded-For": "6.6.6.6",
            "X-Gateway-Key-Id": "spoofed",
            "X-Upstream-Token": "spoofed",
            "Keep-Alive": "timeout=5",
            "X-Custom": "kept",
            # Spellings a CGI-style upstream (WSGI, PHP) reads as the `-` ones: another key's
            # identity, a client IP, the key itself (nginx drops these by default).
            "X_Gateway_Key_Id": "spoofed",
            "X_Forwarded_For": "6.6.6.6",
            "X_Api_Key": SECRET,
        },
    )
    assert response.status_code == 200
    seen = last_request(upstream, "k1")
    assert not [name for name, _ in seen["headers"] if "_" in name]
    headers = {name.lower(): value for name, value in seen["headers"]}
    assert seen["query"] == "a=1&b=2"  # the key parameter is stripped, the rest kept
    assert headers["x-gateway-key-id"] == "k1" and headers["x-gateway-plan"] == "small"
    assert headers["x-upstream-token"] == "up-token"
    assert headers["x-forwarded-for"] == "127.0.0.1"  # the untrusted client's own XFF is dropped
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-custom"] == "kept"
    for gone in ("x-drop-me", "keep-alive", "x-api-key"):
        assert gone not in headers
    assert SECRET not in json.dumps(seen)


LIMIT_HEADER_NAMES = ("concurrency-limit", "concurrency-remaining", "x-concurrent-limit", "x-concurrent-current",
                      "x-concurrent-remaining", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
                      "ratelimit", "ratelimit-policy", "x-request-cost")


def test_the_upstreams_own_limit_headers_never_double_the_gateways(gw: Proc) -> None:
    """An upstream that reports its own limits (the operator's account: ZenRows sends
    `Concurrency-Limit`) answered under the names the gateway writes; the client read both,
    `Concurrency-Limit: 25, 2` and `X-RateLimit-Remaining: 999, 998`, which no integer parser
    (the snippets of docs/clients.md among them) takes. Each name is now the gateway's alone."""
    response = httpx.get(gw.url + "/own_limit_headers", headers={"X-API-Key": OTHER})
    assert response.status_code == 200
    for name in LIMIT_HEADER_NAMES:
        assert len(response.headers.get_list(name)) == 1, (name, response.headers.get_list(name))
    assert response.headers["concurrency-limit"] == "2" and response.headers["x-ratelimit-limit"] == "1000"
    assert response.headers["x-request-cost"] == "1"
    assert '"upstream"' not in response.headers["ratelimit"] + response.headers["ratelimit-policy"]
    # What is not the gateway's passes as ever.
    assert response.headers["x-upstream-own"] == "kept" and response.headers["retry-after"] == "3"


def test_a_trace_carries_no_set_headers_the_upstream_could_reflect(gw: Proc, upstream: str) -> None:
    """TRACE asks the upstream to answer with the request it received (RFC 9110 §9.3.8, which
    forbids sensitive fields in one): with `set_headers` in it, the client would have read the
    operator's upstream token in the answer and could call the upstream without the gateway.
    (The mock upstream reflects every request it does not know, as a TRACE-honouring one does.)"""
    response = httpx.request("TRACE", gw.url + "/echo", headers={"X-API-Key": OTHER, "X-Upstream-Token": "spoofed"})
    assert response.status_code == 200
    assert "up-token" not in response.text and "spoofed" not in response.text
    headers = {name.lower() for name, _ in last_request(upstream, "k2")["headers"]}
    assert "x-upstream-token" not in headers and "x-gateway-key-id" in headers
    # Every other method still carries them.
    assert httpx.get(gw.url + "/echo", headers={"X-API-Key": OTHER}).status_code == 200
    assert ["x-upstream-token", "up-token"] in [[n.lower(), v] for n, v in last_request(upstream, "k2")["headers"]]


def test_streaming_both_ways_with_bounded_memory(gw: Proc) -> None:
    size = 64 * 1024 * 1024
    with httpx.Client(timeout=60, headers={"X-API-Key": OTHER}) as client:
        digest = hashlib.sha256()
        with client.stream("GET", gw.url + f"/download?bytes={size}&mode=chunked") as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                digest.update(chunk)
        assert digest.hexdigest() == download_sha256(size)
        # uploads through a gateway whose cap is 1 MB would be refused: use the big-body gateway below
    peak = _peak_rss_mb(gw)
    assert peak < 120, f"gateway peak RSS {peak:.0f} MB while streaming {size >> 20} MB"


def test_large_upload_streams(tmp_path: Path, upstream: str, client: str) -> None:
    size = 64 * 1024 * 1024
    config = base_config(upstream, client, max_request_body="1GB")
    with gateway(write_config(tmp_path / "gw.yaml", config)) as gw:
        response = httpx.post(gw.url + "/upload", headers={"X-API-Key": OTHER},
                              content=download_blocks(size), timeout=60)
        assert response.status_code == 200
        assert response.json() == {"bytes": size, "sha256": download_sha256(size)}
        peak = _peak_rss_mb(gw)
    assert peak < 120, f"gateway peak RSS {peak:.0f} MB while streaming {size >> 20} MB up"


def _peak_rss_mb(proc: Proc) -> float:
    for line in Path(f"/proc/{proc.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_client_disconnect_frees_the_slot_and_cancels_upstream(gw: Proc, upstream: str) -> None:
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(f"GET /delay_headers?ms=10000 HTTP/1.1\r\nHost: x\r\nX-API-Key: {SECRET}\r\n\r\n".encode())
        time.sleep(0.3)  # the request is admitted and waiting for upstream headers
    closed_at = time.monotonic()
    # the only slot is free again at once
    deadline = closed_at + 2
    while True:
        response = httpx.get(gw.url + "/", headers={"X-API-Key": SECRET})
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert response.status_code == 200
    assert time.monotonic() - closed_at < 1.0
    stats = httpx.get(upstream + "/_stats").json()["keys"]["k1"]
    assert stats["disconnects"] == 1  # the upstream saw its request cancelled
    assert stats["disconnect_times"][0] - closed_at < 0.5


def test_memory_store_refuses_several_workers(tmp_path: Path, upstream: str) -> None:
    config = write_config(tmp_path / "gw.yaml", base_config(upstream))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "-c", str(config), "--workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert result.returncode == 1
    assert "memory://" in result.stderr and "--workers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_invalid_config_exits_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {url: http://x}\nkeys: []\nplans: {}\nroutes: []\nbogus: 1\n")
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(bad)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(bad) in result.stderr


def test_sigterm_exits_zero(tmp_path: Path, upstream: str) -> None:
    with gateway(write_config(tmp_path / "gw.yaml", base_config(upstream))) as gw:
        assert httpx.get(gw.admin_url + "/readyz").status_code == 200
        assert gw.stop() == 0


def test_admin_endpoints_are_never_served_on_the_public_port(gw: Proc, upstream: str) -> None:
    for path in ("/metrics", "/healthz", "/readyz", "/v1/bans", "/v1/keys/k1"):
        assert httpx.get(gw.url + path).status_code == 401  # the public port wants an API key
        proxied = httpx.get(gw.url + path, headers={"X-API-Key": SECRET})
        # with a key it is just a path of the upstream API, proxied like any other
        assert proxied.status_code in (200, 429) and "gateway_requests_total" not in proxied.text
    assert "gateway_requests_total" in httpx.get(gw.admin_url + "/metrics").text
