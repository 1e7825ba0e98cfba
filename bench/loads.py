"""The two load generators, each run as a child whose own CPU time is taken from wait4().

- `wrk` (closed loop): capacity. Every connection sends its next request when the previous
  answer arrives, so throughput is what the system under test can do.
- `loadgen` (open loop, bench/loadgen.c): latency at a fixed offered rate, measured from each
  request's intended send time (no coordinated omission).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from procs import pinned

_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    status: dict[str, int]
    errors: int
    latency_us: dict[str, float]
    generator_cpu_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # per measured process, filled by the caller
    extra: dict[str, Any] = field(default_factory=dict)


def _run_child(argv: Sequence[str], timeout: float) -> tuple[str, str, float]:
    """Run argv; return stdout, stderr and its CPU seconds (user + system, from wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        usage = _reap(proc, time.monotonic() + timeout)
        out.seek(0)
        err.seek(0)
        return out.read().decode(), err.read().decode(), usage


def _reap(proc: subprocess.Popen[bytes], deadline: float) -> float:
    """Wait for the child (killing it past the deadline); its CPU seconds from wait4()."""
    while True:
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = 0  # reaped here: keep Popen from waiting again
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.01)


def _latency(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> tuple[int, float, int, int, dict[str, float]]:
    """(requests, seconds, non-2xx/3xx, socket errors, latency percentiles in µs)."""
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not match:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    requests = int(match.group(1))
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match.group(3)]
    seconds = float(match.group(2)) * scale
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors = sum(int(x) for x in m.groups())
    latency: dict[str, float] = {}
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M):
        latency[f"p{pct}"] = _latency(value)
    return requests, seconds, non2xx, errors, latency


def run_wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    headers: dict[str, str],
    cpus: str | None,
    script: str | None = None,
    script_args: Sequence[str] = (),
    measure: Callable[[], dict[str, dict[int, float]]] | None = None,
) -> LoadResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if script:
        argv += ["-s", script]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    before = measure() if measure else {}
    out, err, gen_cpu = _run_child(pinned(cpus, argv), timeout=seconds + 30)
    after = measure() if measure else {}
    requests, elapsed, non2xx, errors, latency = parse_wrk(out)
    result = LoadResult(
        requests=requests, seconds=elapsed, rps=requests / elapsed if elapsed else 0.0,
        status={"non2xx": non2xx}, errors=errors, latency_us=latency, generator_cpu_s=gen_cpu,
    )
    result.cpu_s = _cpu_deltas(before, after)
    result.extra["raw"] = out[-2000:] + err[-500:]
    return result


def run_loadgen(
    binary: str,
    port: int,
    path: str,
    *,
    rate: float,
    seconds: float,
    warmup: float,
    connections: int,
    headers: dict[str, str],
    cpus: str | None,
    keyfile: str | None = None,
    measure: Callable[[], dict[str, dict[int, float]]] | None = None,
) -> LoadResult:
    argv = [binary, "-R", f"{rate:.0f}", "-d", str(seconds), "-w", str(warmup), "-c", str(connections)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    if keyfile:
        argv += ["-K", keyfile, "-N", "X-API-Key"]
    argv += ["127.0.0.1", str(port), path]
    # CPU is sampled around the measured part only: after the warm-up, until the end of sending.
    out, err, gen_cpu = _run_child(pinned(cpus, argv), timeout=seconds + warmup + 30) if measure is None else _timed(
        argv, cpus, seconds, warmup, measure
    )
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"loadgen failed: {out}\n{err}") from exc
    result = LoadResult(
        requests=int(data["recorded"]), seconds=float(data["duration_s"]), rps=float(data["recorded"]) / float(data["duration_s"]),
        status={k: int(v) for k, v in data["status"].items()}, errors=int(data["errors"]) + int(data["timeouts"]),
        latency_us={k: float(v) for k, v in data["latency_us"].items()}, generator_cpu_s=gen_cpu,
    )
    result.extra = {"max_backlog": data["max_backlog"], "max_send_lag_us": data["max_send_lag_us"], "offered_rps": rate,
                    "sent": int(data["sent"])}
    if measure is not None:
        result.cpu_s = _LAST_TIMED_CPU.copy()
    return result


_LAST_TIMED_CPU: dict[str, float] = {}


def _timed(
    argv: list[str], cpus: str | None, seconds: float, warmup: float,
    measure: Callable[[], dict[str, dict[int, float]]],
) -> tuple[str, str, float]:
    """Run loadgen, sampling process CPU at the end of the warm-up and at the end of sending."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(pinned(cpus, argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        start = time.monotonic()
        time.sleep(0.2 + warmup)  # loadgen lets its connections settle for 0.2 s, then warms up
        before = measure()
        time.sleep(max(0.0, start + 0.2 + warmup + seconds - time.monotonic()))
        after = measure()
        _LAST_TIMED_CPU.clear()
        _LAST_TIMED_CPU.update(_cpu_deltas(before, after))
        usage = _reap(proc, start + seconds + warmup + 30)
        out.seek(0)
        err.seek(0)
        return out.read().decode(), err.read().decode(), usage


def _cpu_deltas(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, samples in after.items():
        previous = before.get(name, {})
        out[name] = sum(value - previous.get(pid, 0.0) for pid, value in samples.items())
    return out
