"""A store URL `check-config` accepts is one `serve` can open (probe-config findings 1, 4, 7):

- every URL the store would fail to parse is refused by both, as one located line
  `FILE:LINE: store.url: ...`, before "listening", never a traceback, `--workers 2` included;
- no credential in `upstream.url` or a refused `store.url` reaches check-config, serve's one
  line or the reload log;
- a store that still fails to open in the worker (a backstop: injected here) is one line and
  exit 1, and `--workers 2` stops instead of restarting crashing workers for ever.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.admission.identity import hash_key
from tests.support.processes import GATEWAY_LOGS, ROOT, gateway, write_config
from tests.support.redis_server import free_port
from tests.support.secrets import secret

pytestmark = [pytest.mark.e2e]

KEY = secret("store-url-refusals")
UPSTREAM_PASSWORD = secret("upstream-userinfo")
UPSTREAM_QUERY_KEY = secret("upstream-query")
STORE_PASSWORD = secret("memory-url")

BAD_STORE_URLS = [
    "redis://127.0.0.1:6379/10?foo=1",
    "redis://127.0.0.1:notaport/10",
    "redis://127.0.0.1:99999/10",
    "unix:///tmp/x.sock?db=abc",
    "redis+sentinel://127.0.0.1:26379",
    "redis://127.0.0.1:6379/10?socket_timeout=abc",
    "redis://127.0.0.1:6379/10?ssl_cert_reqs=none",
    "redis://127.0.0.1:6379/abc",  # was db 0, silently
]
LOCATED = re.compile(r"gw\.yaml:\d+: store\.url: ")


def config(store_url: str = "memory://", upstream_url: str = "http://127.0.0.1:9") -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "upstream": {"url": upstream_url},
        "store": {"url": store_url},
        "keys": [{"id": "k", "sha256": hash_key(KEY), "plan": "p"}],
        "plans": {"p": {"limits": {"rpm": {"rate": "100/1m"}}}},
        "routes": [{"path": "/**", "limits": ["rpm"]}],
    }


def run(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("url", BAD_STORE_URLS)
def test_check_config_and_serve_refuse_a_store_url_the_store_cannot_open(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path / "gw.yaml", config(url))
    check = run("check-config", "-c", str(path))
    assert check.returncode == 1 and check.stdout == ""
    assert check.stderr.count("\n") == 1 and LOCATED.search(check.stderr), check.stderr
    for workers in ("1", "2"):
        serve = run("serve", "-c", str(path), "--workers", workers)
        assert serve.returncode == 1, serve.stderr
        assert serve.stderr.count("\n") == 1 and LOCATED.search(serve.stderr), serve.stderr
        assert "Traceback" not in serve.stderr and "listening" not in serve.stderr


@pytest.mark.parametrize(("upstream_url", "store_url"), [
    (f"https://apiuser:{UPSTREAM_PASSWORD}@api.example.com", "memory://"),
    (f"https://{UPSTREAM_PASSWORD}@api.example.com", "memory://"),
    (f"http://apiuser:{UPSTREAM_PASSWORD}@127.0.0.1:notaport", "memory://"),
    (f"https://api.example.com/?api_key={UPSTREAM_QUERY_KEY}", "memory://"),
    ("http://127.0.0.1:9", f"memory://:{STORE_PASSWORD}@redis:6379/0"),
    ("http://127.0.0.1:9", f"redis://:{STORE_PASSWORD}@redis:6379/0?foo=1"),
])  # fmt: skip
def test_check_config_and_serve_never_print_a_credential(tmp_path: Path, upstream_url: str, store_url: str) -> None:
    path = write_config(tmp_path / "gw.yaml", config(store_url, upstream_url))
    for args in (("check-config", "-c", str(path)), ("serve", "-c", str(path))):
        done = run(*args)
        assert done.returncode == 1
        shown = done.stdout + done.stderr
        assert re.search(r"gw\.yaml:\d+: (upstream|store)\.url: ", shown), shown
        for credential in (UPSTREAM_PASSWORD, UPSTREAM_QUERY_KEY, STORE_PASSWORD):
            assert credential not in shown, shown


def test_a_refused_reload_logs_no_credential(tmp_path: Path) -> None:
    path = write_config(tmp_path / "gw.yaml", config())
    with gateway(path) as gw:
        refused = config(upstream_url=f"https://apiuser:{UPSTREAM_PASSWORD}@api.example.com")
        refused.update(listen=f"127.0.0.1:{gw.port}", admin_listen=f"127.0.0.1:{gw.admin_port}")
        write_config(path, refused)
        gw.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload refused" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = gw.log()
    assert "reload refused" in log and "upstream.url" in log, log
    assert UPSTREAM_PASSWORD not in log and "apiuser:***@api.example.com" in log, log


# -- the backstop: a store that fails to open in the worker ------------------------------------

BREAK_STORE = '''\
import os
if os.environ.get("GATEWAY_TEST_BREAK_STORE"):
    import gateway.state

    def open_store(*args, **kwargs):
        raise TypeError("injected: AbstractConnection.__init__() got an unexpected keyword argument 'x'")

    gateway.state.open_store = open_store
'''


def broken_store_env(tmp_path: Path) -> dict[str, str]:
    """Every gateway process started with it fails to open its store (sitecustomize)."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(BREAK_STORE)
    paths = [str(tmp_path / "inject"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p), "GATEWAY_TEST_BREAK_STORE": "1"}


def test_a_store_that_fails_to_open_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = write_config(tmp_path / "gw.yaml", config())
    serve = run("serve", "-c", str(path), env=broken_store_env(tmp_path))
    assert serve.returncode == 1
    assert "Traceback" not in serve.stderr, serve.stderr
    errors = [line for line in serve.stderr.splitlines() if line.startswith("gateway: ")]
    assert len(errors) == 1 and "could not start a worker" in errors[0] and "TypeError" in errors[0], serve.stderr


def test_workers_that_fail_to_start_stop_the_gateway_instead_of_restarting(tmp_path: Path) -> None:
    path = write_config(tmp_path / "gw.yaml", config("redis://127.0.0.1:9/0"))
    log_path = tmp_path / "gw.workers.log"
    GATEWAY_LOGS.append(log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(path), "--workers", "2"],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, **broken_store_env(tmp_path)})
    try:
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    text = log_path.read_text()
    assert code == 1, text
    assert "Traceback" not in text and "starting a new one" not in text, text
    assert "before it served; stopping the gateway" in text, text
    failures = [line for line in text.splitlines() if "could not start a worker" in line and "(worker " in line]
    assert 1 <= len(failures) <= 2 and "TypeError" in failures[0], text
