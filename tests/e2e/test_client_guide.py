"""docs/clients.md's snippets, run as written against a real gateway and the example upstream.

Each snippet (a ```python block after a `<!-- snippet: NAME -->` line) runs in its own Python
process with GATEWAY_URL and GATEWAY_API_KEY set, while another client holds one of the key's
3 slots: the snippet sizes its pool to 3 from Concurrency-Limit, so it meets 429
concurrency_limited and must back off and retry. It passes when every page came back (the
snippet asserts it and exits 0), the gateway refused it at least once, and no IP is banned
(bans are on, as in the quickstart: a client that hammered would be)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ROOT, Proc, _wait_http, gateway, write_config
from tests.support.redis_server import free_port

pytestmark = pytest.mark.e2e

GUIDE = (ROOT / "docs" / "clients.md").read_text()
SNIPPETS = dict(re.findall(r"<!-- snippet: (\S+) -->\n```python\n(.*?)```", GUIDE, re.S))
SLOTS = 3


def test_the_guide_has_its_four_snippets() -> None:
    assert set(SNIPPETS) == {"requests", "httpx", "aiohttp", "sdk"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("client-guide")
    port = free_port()
    log_path = tmp / "example-upstream.log"
    with open(log_path, "wb") as log:
        upstream = subprocess.Popen(
            [sys.executable, "-m", "gateway", "example-upstream", "--listen", f"127.0.0.1:{port}",
             "--delay", "200ms"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", upstream, log_path)
        config = {
            "upstream": {"url": f"http://127.0.0.1:{port}"},
            "keys": [{"id": name, "key": f"guide-{name}-key", "plan": "guide"} for name in SNIPPETS],
            "plans": {"guide": {"limits": {"rpm": {"rate": "600/1m"}, "requests": {"concurrency": SLOTS}}}},
            "routes": [{"path": "/v1/**", "limits": ["rpm", "requests"]}],
            "bans": {"strikes": 30, "within": "1m", "duration": "1m"},
        }
        with gateway(write_config(tmp / "gw.yaml", config)) as gw:
            yield gw
    finally:
        upstream.terminate()
        upstream.wait(10)


def refusals(gw: Proc) -> float:
    text = httpx.get(gw.admin_url + "/metrics").text
    found = re.search(r'gateway_requests_total\{[^}]*outcome="concurrency_limited"[^}]*\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def in_use(gw: Proc, key_id: str) -> int:
    view = httpx.get(f"{gw.admin_url}/v1/keys/{key_id}").json()
    return sum(bucket["in_use"] for bucket in view["buckets"] if bucket["kind"] == "concurrency")


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_gets_everything_done_without_a_ban(name: str, stack: Proc, tmp_path: Path) -> None:
    gw = stack
    key = f"guide-{name}-key"
    before = refusals(gw)
    holder = threading.Thread(target=httpx.get, args=(gw.url + "/v1/scrape?delay_ms=4000",),
                              kwargs={"headers": {"X-API-Key": key}, "timeout": 30})
    holder.start()
    try:
        deadline = time.monotonic() + 10
        while in_use(gw, name) < 1:  # the other client holds its slot before the snippet starts
            assert time.monotonic() < deadline
            time.sleep(0.02)
        script = tmp_path / f"snippet_{name}.py"  # not {name}.py: it would shadow the library
        script.write_text(SNIPPETS[name])
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "GATEWAY_URL": gw.url, "GATEWAY_API_KEY": key})
    finally:
        holder.join()
    assert run.returncode == 0, run.stderr
    assert "30 pages" in run.stdout
    met = refusals(gw) - before
    assert met > 0, "the snippet never met a 429: the test did not test its retries"
    assert met <= 10, f"{met} refusals for one slot held 4 s: the snippet does not back off in its place"
    assert httpx.get(gw.admin_url + "/v1/bans").json() == []
    assert in_use(gw, name) == 0
