"""Where a worker's CPU goes under load: py-spy samples of one process while wrk saturates it.

py-spy (PyPI, installed into bench/.venv) records collapsed stacks (`--format raw`); they are
summarised two ways: self time by component (the file of the innermost frame) and inclusive
time of the functions on the gateway's own path.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import loads
from stack import BENCH_DIR, LOAD_CPUS, PATH, Scenario

PY_SPY = os.path.join(BENCH_DIR, ".venv", "bin", "py-spy")
RATE = 250  # samples per second

# (component, pattern on the innermost frame's file); first match wins.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("access log (json.dumps + write)", r"gateway/accesslog\.py|(^|/)json/"),
    ("metrics (prometheus_client)", r"(^|/)prometheus_client/"),
    ("redis-py client (+hiredis)", r"(^|/)(redis|hiredis)/"),
    ("aiohttp client (+yarl, multidict)", r"(^|/)(aiohttp|yarl|multidict|aiohappyeyeballs)/"),
    ("httpx client (+httpcore, h11, anyio)", r"(^|/)(httpx|httpcore|h11|anyio|sniffio)/"),
    ("uvicorn server (httptools protocol)", r"(^|/)(uvicorn|httptools)/"),
    ("gateway store + admission", r"gateway/store/|gateway/admission/"),
    ("gateway proxy (forwarder, headers)", r"gateway/proxy/|gateway/responses\.py"),
    ("gateway app, metrics glue, other modules", r"(^|/)gateway/"),
    ("bare proxy app", r"bare_proxy\.py"),
    ("event loop (asyncio + uvloop; Runner.run is uvloop's C loop)", r"(^|/)(asyncio|uvloop)/|runners\.py|events\.py"),
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*):(?P<line>\d+)\)$")


def parse_raw(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            frames.append((match.group("func"), match.group("file")) if match else (frame, ""))
        stacks.append((frames, int(count)))
    return stacks


def summarise(stacks: list[tuple[list[tuple[str, str]], int]], rps: float = 0.0, seconds: float = 0.0,
              rate: int = 250) -> dict[str, Any]:
    """Shares of the samples; with the load's rps, also µs of CPU per request (share × busy
    seconds / requests), since py-spy samples only while the process is running."""
    total = sum(count for _, count in stacks) or 1
    components: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        leaf_func, leaf_file = frames[-1]
        component = next((name for name, pattern in COMPONENTS if re.search(pattern, leaf_file)), "other")
        components[component] += count
        self_time[f"{leaf_func} ({_short(leaf_file)})"] += count
        seen = set()
        for func, file in frames:
            if "gateway/" in file or "bare_proxy" in file:
                name = f"{func} ({_short(file)})"
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count
    busy_s = total / rate
    us_per_request = busy_s / (rps * seconds) * 1e6 if rps and seconds else 0.0
    return {
        "samples": total,
        "busy_fraction": round(busy_s / seconds, 2) if seconds else None,
        "cpu_us_per_request": round(us_per_request),
        "components": {k: round(100 * v / total, 1) for k, v in components.most_common()},
        "self_top": [(k, round(100 * v / total, 1)) for k, v in self_time.most_common(25)],
        "gateway_inclusive": [(k, round(100 * v / total, 1)) for k, v in inclusive.most_common(40) if v / total >= 0.01],
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", "gateway/", "python3.11/"):
        if marker in path:
            return (("gateway/" if marker == "gateway/" else "") + path.split(marker, 1)[1])
    return os.path.basename(path)


def worker_pid(scenario: Scenario) -> int:
    """The process that serves requests: the gateway itself with one worker (`taskset` execs
    the program, so the pid is the program's own)."""
    if scenario.proc is None:
        raise ValueError(f"{scenario.id} has no process of its own to profile")
    return scenario.proc.pid


def profile(scenario: Scenario, run_dir: str, *, seconds: float, connections: int, rate: float | None = None,
            loadgen: str = "") -> dict[str, Any]:
    """Profile under wrk (saturated), or under loadgen at a fixed `rate` (then the latency too)."""
    pid = worker_pid(scenario)
    raw_path = os.path.join(run_dir, f"profile-{scenario.id}{'' if rate is None else f'-{rate:.0f}rps'}.txt")
    load: dict[str, Any] = {}

    def drive() -> None:
        if rate is None:
            result = loads.run_wrk(f"http://127.0.0.1:{scenario.port}{PATH}", seconds=seconds + 2, connections=connections,
                                   headers=scenario.headers, cpus=LOAD_CPUS)
        else:
            result = loads.run_loadgen(loadgen, scenario.port, PATH, rate=rate, seconds=seconds + 1, warmup=1.0,
                                       connections=64, headers=scenario.headers, cpus=LOAD_CPUS)
            load["latency_us"] = result.latency_us
        load["rps"] = result.rps

    thread = threading.Thread(target=drive)
    thread.start()
    if rate is not None:
        time.sleep(1.5)  # past loadgen's warm-up
    proc = subprocess.run(
        [PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(RATE), "--nonblocking",
         "--format", "raw", "--output", raw_path],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    thread.join()
    if proc.returncode != 0 or not os.path.exists(raw_path):
        return {"error": (proc.stderr or proc.stdout)[-500:]}
    with open(raw_path) as file:
        summary = summarise(parse_raw(file.read()), load.get("rps", 0.0), seconds, RATE)
    summary["rps_during_profile"] = round(load.get("rps", 0.0))
    summary["offered_rps"] = None if rate is None else round(rate)
    if "latency_us" in load:
        summary["latency_us"] = load["latency_us"]
    summary["seconds"] = seconds
    summary["raw"] = os.path.relpath(raw_path, os.path.dirname(BENCH_DIR))
    return summary


def resummarise(summary: dict[str, Any], root: str) -> dict[str, Any]:
    """Recompute a saved summary from its raw stacks (after changing the grouping)."""
    path = os.path.join(root, summary.get("raw", ""))
    if "raw" not in summary or not os.path.exists(path):
        return summary
    with open(path) as file:
        fresh = summarise(parse_raw(file.read()), summary.get("rps_during_profile", 0), summary.get("seconds", 10), RATE)
    return summary | fresh
