"""Real processes for end-to-end tests: `gateway serve` and the mock upstream, on free ports."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
# Every gateway log written in this test session, for the final secret-leak sweep.
GATEWAY_LOGS: list[Path] = []
# Where logs with no test's tmp_path to go to are written: a directory under pytest's base
# temporary directory, set for the session by tests/conftest.py (never loose in /tmp).
LOG_DIR: Path | None = None


def log_dir() -> Path:
    if LOG_DIR is None:
        raise RuntimeError("tests.support.processes.LOG_DIR is set by tests/conftest.py")
    return LOG_DIR


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def _wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up:\n{log_path.read_text()}")


@contextmanager
def gateway(
    config_path: Path,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/healthz",
    listen_host: str = "127.0.0.1",  # "[::]": dual-stack, IPv4 clients seen as ::ffff:a.b.c.d
    open_files: int | None = None,  # the process's open-file limit, soft and hard
) -> Iterator[Proc]:
    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    for attempt in range(3):  # a free port can be taken by someone else before we bind it
        port, admin_port = free_port(), free_port()
        while admin_port == port:  # the kernel may hand the port just released out again
            admin_port = free_port()
        log_path = config_path.with_suffix(f".{port}.log")
        GATEWAY_LOGS.append(log_path)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "-c", str(config_path),
                 "--listen", f"{listen_host}:{port}", "--admin-listen", f"127.0.0.1:{admin_port}",
                 "--workers", str(workers)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
                preexec_fn=limit_open_files if open_files is not None else None,
            )
        try:
            process.wait(0.3)
        except subprocess.TimeoutExpired:
            break  # still running: it bound its ports
        if "cannot listen" not in log_path.read_text() or attempt == 2:
            break
    proc = Proc(process, port, admin_port, log_path)
    try:
        _wait_http(proc.admin_url + ready_path, process, log_path)
        yield proc
    finally:
        proc.stop()


@contextmanager
def mock_upstream() -> Iterator[str]:
    """The raw mock upstream as its own process; yields its base URL."""
    port = free_port()
    log_path = log_dir() / f"mock-upstream-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.mock_upstream", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/_stats", process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until_in_flight(upstream: str, key_id: str, count: int, within: float = 5.0) -> None:
    """Until the mock upstream has `count` requests of `key_id` in progress: a test that wants a
    refusal asks only then, since its own request, sent earlier, would take a slot itself."""
    deadline = time.monotonic() + within
    while httpx.get(upstream + "/_stats").json()["keys"].get(key_id, {}).get("in_flight", 0) < count:
        assert time.monotonic() < deadline, f"{count} requests of {key_id} never held their slots at once"
        time.sleep(0.02)
