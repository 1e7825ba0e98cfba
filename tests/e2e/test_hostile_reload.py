"""A running gateway meets a hostile config file (issue 15): the reload is refused without
delaying requests, the old config stays, the error is logged and counted, and the file watcher
and SIGHUP keep working afterwards."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Proc, gateway, mock_upstream, write_config
from tests.unit.test_config_hostile import HUGE, merge_bomb

pytestmark = pytest.mark.e2e

KEY = "reload-key-0123456789"


def config(upstream: str, rate: str = "5000/1m") -> dict[str, object]:
    return {
        "upstream": {"url": upstream},
        "keys": [{"id": "alice", "key": KEY, "plan": "free"}],
        "plans": {"free": {"limits": {"rpm": {"rate": rate}}}},
        "routes": [{"path": "/**", "limits": ["rpm"]}],
    }


def reloads(proc: Proc, result: str) -> float:
    text = httpx.get(proc.admin_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f'gateway_config_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, within: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def limit_of(proc: Proc) -> str:
    response = httpx.get(proc.url + "/x", headers={"X-API-Key": KEY}, timeout=5)
    assert response.status_code == 200, response.text
    return response.headers["X-RateLimit-Limit"]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Proc, Path, str]]:
    with mock_upstream() as upstream:
        path = write_config(tmp_path / "gateway.yaml", config(upstream))
        with gateway(path) as proc:
            yield proc, path, upstream


def replace_file(path: Path, data: bytes) -> None:
    """As an editor or a ConfigMap update does: a new file renamed over the old one."""
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


HOSTILE = {
    "merge bomb": merge_bomb(9).encode(),
    "huge integer": None,  # filled in from the valid config
    "too big": b"#" * (8 * 1024 * 1024 + 1),
}


@pytest.mark.parametrize("name", ["merge bomb", "huge integer", "too big", "fifo", "dev zero"])
def test_a_hostile_file_is_refused_and_the_watcher_goes_on(running: tuple[Proc, Path, str], name: str) -> None:
    proc, path, upstream = running
    assert limit_of(proc) == "5000"
    errors = reloads(proc, "error")
    if name == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif name == "dev zero":
        path.unlink()
        path.symlink_to("/dev/zero")
    elif name == "huge integer":
        replace_file(path, path.read_bytes().replace(b"5000/1m", HUGE.encode() + b"/1m"))
    else:
        replace_file(path, HOSTILE[name])
    wait_for(lambda: reloads(proc, "error") == errors + 1)
    assert limit_of(proc) == "5000"  # the old config serves on
    assert "reload refused, keeping the running config" in proc.log()
    assert "Traceback" not in proc.log()
    # a later valid edit is picked up by the watcher
    path.unlink()
    write_config(path, config(upstream, rate="7000/1m"))
    wait_for(lambda: limit_of(proc) == "7000")
    # and SIGHUP still works
    write_config(path, config(upstream, rate="9000/1m"))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: limit_of(proc) == "9000")


def test_requests_are_not_delayed_while_a_slow_file_is_parsed(running: tuple[Proc, Path, str]) -> None:
    """A file that takes seconds to parse (valid YAML, thousands of unknown keys) is parsed off
    the event loop: requests during the reload take what they take without it."""
    proc, path, upstream = running
    filler = "".join(f"x{i}: [{', '.join(['1'] * 20)}]\n" for i in range(15_000))
    slow = path.read_text() + filler
    started = time.perf_counter()
    # measure the parse in this process, for comparison
    from gateway.config.loader import ConfigError, load_config_text

    with pytest.raises(ConfigError):
        load_config_text(slow, "slow.yaml")
    parse_seconds = time.perf_counter() - started
    errors = reloads(proc, "error")
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                sent = time.perf_counter()
                client.get(proc.url + "/x", headers={"X-API-Key": KEY})
                latencies.append(time.perf_counter() - sent)
                time.sleep(0.01)

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(0.3)
    replace_file(path, slow.encode())
    try:
        wait_for(lambda: reloads(proc, "error") == errors + 1, within=60)
    finally:
        stop.set()
        thread.join()
    worst = max(latencies)
    print(f"parse in process {parse_seconds:.2f}s; worst request during the reload {worst * 1000:.0f} ms "
          f"over {len(latencies)} requests")
    # were the parse on the event loop, some request would wait for most of it
    assert worst < parse_seconds / 3, (worst, parse_seconds)
