"""The admin port as a real `gateway serve` exposes it (issue 15): a non-loopback admin port
without a token does not start, the opt-out does, and a rebinding Host gets 421 on the wire."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config.loader import load_config
from gateway.reload import reload_config
from gateway.state import GatewayState
from tests.support.processes import ROOT, _wait_http
from tests.support.redis_server import free_port
from tests.unit.test_admin_access import MINIMAL

pytestmark = pytest.mark.e2e


def serve(config: Path, admin_listen: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "-c", str(config),
         "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", admin_listen],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )


def test_serve_refuses_a_non_loopback_admin_port_without_a_token(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(MINIMAL)
    process = serve(config, f"0.0.0.0:{free_port()}")
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"gateway: invalid config: {config}:override: admin_listen: 0.0.0.0:")
    assert "admin_token is not set" in err and "admin_open: true" in err


def raw_get(port: int, host: str, path: str = "/v1/bans") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_the_opt_out_starts_and_rebinding_gets_421(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(MINIMAL + "admin_open: true\n")
    port = free_port()
    process = serve(config, f"0.0.0.0:{port}")
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", process, Path("/dev/null"))  # type: ignore[arg-type]
        status, body = raw_get(port, "evil.example")
        assert status == 421 and b'"error":"misdirected_request"' in body
        assert raw_get(port, f"evil.example:{port}")[0] == 421
        assert raw_get(port, f"127.0.0.1:{port}")[0] == 200
        assert raw_get(port, f"localhost:{port}")[0] == 200
        assert raw_get(port, "evil.example", "/healthz")[0] == 200  # probes stay open
        assert raw_get(port, "evil.example", "/readyz")[0] == 200
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_a_reload_that_would_leave_the_running_admin_port_open_is_refused(tmp_path: Path) -> None:
    """admin_listen needs a restart, so the file's new token rules are checked against the running address."""
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL + "admin_listen: 0.0.0.0:9464\nadmin_token: s3cret-token\n")
    state = GatewayState.create(load_config(path))
    path.write_text(MINIMAL + "admin_listen: 127.0.0.1:9464\n")  # valid alone: loopback, no token
    assert not reload_config(state, str(path), {})
    assert state.routing.config.admin_token == "s3cret-token"
    samples = {s.labels["result"]: s.value for s in state.metrics.config_reloads.collect()[0].samples
               if s.name.endswith("_total")}
    assert samples.get("error") == 1.0
    assert yaml.safe_load(path.read_text())["admin_listen"] == "127.0.0.1:9464"
