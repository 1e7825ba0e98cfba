"""The command line as a user meets it: check-config, hash-key, demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT

pytestmark = pytest.mark.e2e


def gateway_cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_hash_key() -> None:
    result = gateway_cli("hash-key", stdin="test\n")
    assert result.returncode == 0
    assert result.stdout.strip() == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "config").glob("*.yaml")))
def test_check_config_accepts_every_example(path: str) -> None:
    result = gateway_cli("check-config", "-c", path)
    assert result.returncode == 0, result.stderr
    assert "plans" in result.stdout.lower() and "routes" in result.stdout.lower()


def test_check_config_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "upstream:\n  url: http://127.0.0.1:9000\n"
        "keys: []\n"
        "plans:\n  free:\n    limits:\n      rpm: {rate: 60/1x}\n"
        "routes:\n  - path: v1\n"
        "bogus: 1\n"
    )
    result = gateway_cli("check-config", "-c", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 3
    assert any(line.startswith(f"{bad}:7: plans.free.limits.rpm.rate:") for line in lines), lines
    assert any(line.startswith(f"{bad}:9: routes[0].path:") for line in lines), lines
    assert any(line.startswith(f"{bad}:10: bogus:") for line in lines), lines


def test_demo_runs_and_shows_refusals() -> None:
    result = gateway_cli("demo", timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "200 ok" in out
    assert "429 rate_limited" in out and "Retry-After" in out
    assert "429 concurrency_limited" in out
    assert "401 invalid_api_key" in out
    assert "403 ip_banned" in out
    assert "even with a valid key now → 403 ip_banned" in out


def test_serve_says_where_it_listens_once_and_stops_in_one_line(tmp_path: Path) -> None:
    """Two uvicorn servers run in one worker (public and admin): their start/stop lines would
    each appear twice. The gateway says its two addresses once, then that it stopped."""
    import signal

    from tests.support.processes import gateway, write_config

    config = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "keys": [{"id": "k", "key": "serve-output-key", "plan": "p"}],
        "plans": {"p": {"limits": {"rpm": {"rate": "1/1m"}}}},
        "routes": [{"path": "/**", "limits": ["rpm"]}],
    }
    with gateway(write_config(tmp_path / "gw.yaml", config)) as gw:
        assert gw.stop(signal.SIGINT) == 0  # Ctrl+C
    lines = gw.log().splitlines()
    listening = [line for line in lines if "listening on" in line]
    assert len(listening) == 1, lines
    assert f"listening on {gw.url} (admin {gw.admin_url})" in listening[0]
    assert sum("stopped (exit code 0)" in line for line in lines) == 1
    assert not [line for line in lines if "uvicorn" in line], lines


def test_check_config_whose_reader_has_gone_ends_without_a_traceback() -> None:
    # `gateway check-config -c F | head -1`: the reader may be gone before the summary is written
    process = subprocess.Popen([sys.executable, "-m", "gateway", "check-config", "-c", "config/gateway.yaml"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command has loaded anything: its first write meets EPIPE
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(30) == 1
    assert b"Traceback" not in stderr and stderr == b"", stderr
