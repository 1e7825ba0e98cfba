"""Instructions per request under callgrind: the bare proxy and the gateway on each store.

    bench/run --instructions [--instr-phases 2] [--instr-requests 640]

Wall-clock throughput on a shared 2-core machine moves 2-3x between runs; the user-space
instructions a process executes per request move by well under 1 %. Each system runs alone
under `valgrind --tool=callgrind --instr-atstart=no` (nginx, Redis and this load client run
natively): after an uninstrumented warm-up, instrumentation is switched on, a short warm-up
runs again, and each measured phase is bracketed by `callgrind_control -z` (zero) and `-d`
(dump), so a dump holds that phase's instructions only. A phase is `--instr-requests`
requests over 32 keep-alive connections, closed loop (the batching of metrics, access log and
Redis pipeline across one event-loop iteration included). An idle phase measures the
time-driven background (uvicorn's ticks, heartbeats, the config watcher), which is
subtracted (its rate x the phase's wall time). The store timeout is raised to 30 s: valgrind
runs ~50x slower and the benchmark's 100 ms would turn Redis calls into fallbacks; every phase
checks the gateway's /metrics for store errors and fallback decisions.
Instructions exclude the kernel and say nothing of cache misses: CPU-µs per request in the
closed-loop table is the wall-clock counterpart.
"""

from __future__ import annotations

import asyncio
import glob
import os
import statistics
import subprocess
import time
import urllib.request
from typing import Any

import report
from procs import Proc, free_port, wait_port
from stack import BENCH_DIR, KEY, PATH, PROJECT_PYTHON, Stack

CONNECTIONS = 32
REQUEST = (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
           "User-Agent: bench-instructions\r\nAccept: */*\r\n\r\n").encode()
SYSTEMS = ("bare", "memory", "redis")
LABELS = {"bare": "bare proxy (the gateway's forwarder, no admission)", "memory": "gateway, memory store",
          "redis": "gateway, Redis store"}


class _Connection:
    """One keep-alive HTTP/1.1 connection sending requests one after another."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes = REQUEST) -> None:
        self.reader, self.writer = reader, writer
        self.request = request
        self.statuses: dict[int, int] = {}

    async def requests(self, count: int) -> None:
        for _ in range(count):
            self.writer.write(self.request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            self.statuses[status] = self.statuses.get(status, 0) + 1
            length = next((int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), None)
            if length is None:
                raise RuntimeError(f"response without content-length: {lines[0]}")
            await self.reader.readexactly(length)


async def _open(port: int, connections: int = CONNECTIONS, request: bytes = REQUEST) -> list[_Connection]:
    """Keep-alive connections, each past its first request (which is never measured)."""
    conns = [_Connection(*await asyncio.open_connection("127.0.0.1", port), request) for _ in range(connections)]
    await asyncio.gather(*(c.requests(1) for c in conns))
    for conn in conns:
        conn.statuses.clear()
    return conns


async def _load(conns: list[_Connection], total: int) -> dict[int, int]:
    """`total` requests spread over the connections, closed loop; statuses counted."""
    shares = [total // len(conns) + (1 if i < total % len(conns) else 0) for i in range(len(conns))]
    await asyncio.gather(*(c.requests(n) for c, n in zip(conns, shares, strict=True)))
    statuses: dict[int, int] = {}
    for conn in conns:
        for status, count in conn.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    return statuses


async def _phase(
    pid: int, port: int, requests: int, idle_s: float, request: bytes = REQUEST
) -> tuple[dict[int, int], float]:
    """One measured phase between `callgrind_control --zero` and `--dump`: `requests` over fresh
    connections (their setup outside the phase), or `idle_s` seconds of nothing if 0."""
    conns = await _open(port, request=request) if requests else []
    await asyncio.sleep(0.2)
    _callgrind("--zero", pid)
    started = time.monotonic()
    statuses = await _load(conns, requests) if requests else {}
    if not requests:
        await asyncio.sleep(idle_s)
    wall = time.monotonic() - started
    _callgrind("--dump", pid)
    for conn in conns:
        conn.writer.close()
    return statuses, wall


async def _warm(port: int, requests: int, request: bytes = REQUEST) -> None:
    conns = await _open(port, request=request)
    statuses = await _load(conns, requests)
    for conn in conns:
        conn.writer.close()
    if set(statuses) != {200}:
        raise RuntimeError(f"warm-up statuses {statuses}")


def _store_trouble(admin_port: int | None) -> float:
    """Store errors + fallback decisions so far (from /metrics); 0 for the bare proxy."""
    if admin_port is None:
        return 0.0
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=120).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(("gateway_store_errors_total", "gateway_store_fallback_decisions_total")))


def _callgrind(command: str, pid: int) -> None:
    done = subprocess.run(["callgrind_control", command, str(pid)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {command} {pid}: {done.stdout} {done.stderr}")


def _new_dump(pattern: str, seen: set[str], timeout: float = 120) -> int:
    """The total instructions of the next complete dump matching `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(set(glob.glob(pattern)) - seen):
            with open(path) as file:
                totals = [line for line in file if line.startswith(("totals:", "summary:"))]
            if totals:
                seen.add(path)
                return int(totals[-1].split()[1])
        time.sleep(0.1)
    raise RuntimeError(f"no callgrind dump appeared ({pattern})")


def _argv(stack: Stack, system: str, port: int) -> tuple[list[str], int | None]:
    if system == "bare":
        return [PROJECT_PYTHON, os.path.join(BENCH_DIR, "bare_proxy.py"), "--listen", f"127.0.0.1:{port}",
                "--upstream", f"http://127.0.0.1:{stack.upstream_port}", "--client", "aiohttp"], None
    admin_port = free_port()
    config = stack.gateway_config(f"instr-{system}", port, admin_port, "aiohttp", system, bans=False,
                                  store_timeout="30s")
    # `python -m gateway`: valgrind must start the interpreter itself, not a shebang script
    return [PROJECT_PYTHON, "-m", "gateway", "serve", "-c", config], admin_port


def measure(stack: Stack, system: str, phases: int, requests: int, idle_s: float = 5.0) -> dict[str, Any]:
    """Instructions per request of one system, each phase idle-corrected."""
    port = free_port()
    argv, admin_port = _argv(stack, system, port)
    return measure_process(stack, system, argv, port, admin_port, phases, requests, idle_s)


def measure_process(
    stack: Stack, system: str, argv: list[str], port: int, admin_port: int | None, phases: int, requests: int,
    idle_s: float = 5.0, request: bytes = REQUEST,
) -> dict[str, Any]:
    """Instructions per request of the process `argv` (listening on `port`) sent `request`."""
    out_dir = os.path.join(stack.run_dir, f"callgrind-{system}")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    proc = Proc(f"instr-{system}", ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                   f"--callgrind-out-file={out_dir}/cg.%p.out", *argv],
                os.path.join(stack.run_dir, f"instr-{system}.log"), env=env).start()
    result: dict[str, Any] = {"system": system, "phases": []}
    try:
        wait_port(port, proc, 300)
        pattern = os.path.join(out_dir, f"cg.{proc.pid}.out.*")
        seen: set[str] = set()
        asyncio.run(_warm(port, 320, request))  # uninstrumented warm-up: imports, connections, caches
        _callgrind("--instr=on", proc.pid)
        asyncio.run(_warm(port, 64, request))  # instrumented warm-up, not counted
        for count in [requests] * phases + [0]:  # the last phase: idle
            trouble = _store_trouble(admin_port)
            statuses, wall = asyncio.run(_phase(proc.pid, port, count, idle_s, request))
            instructions = _new_dump(pattern, seen)
            if statuses != ({200: count} if count else {}):
                raise RuntimeError(f"{system}: statuses {statuses}")
            if _store_trouble(admin_port) != trouble:
                raise RuntimeError(f"{system}: admissions decided without the store (store errors or fallbacks)")
            result["phases"].append({"kind": "load" if count else "idle", "requests": count,
                                     "instructions": instructions, "wall_s": wall})
    finally:
        proc.stop(grace=60)
    idle = result["phases"][-1]
    idle_rate = idle["instructions"] / idle["wall_s"]
    per_request = [(p["instructions"] - idle_rate * p["wall_s"]) / p["requests"]
                   for p in result["phases"] if p["kind"] == "load"]
    result.update(idle_per_s=idle_rate, per_request=per_request, median=statistics.median(per_request),
                  spread=(max(per_request) - min(per_request)) / statistics.median(per_request))
    return result


def run(stack: Stack, phases: int, requests: int) -> dict[str, Any]:
    """Every system in turn (one at a time: valgrind takes a whole CPU)."""
    measured = {}
    for system in SYSTEMS:
        measured[system] = measure(stack, system, phases, requests)
        print(f"instructions: {system} {measured[system]['median']:,.0f} per request", flush=True)
    return {"connections": CONNECTIONS, "phases": phases, "requests": requests, "systems": measured}


def render(instr: dict[str, Any]) -> str:
    """The table for docs/benchmarks.md."""
    systems = instr["systems"]
    bare = systems["bare"]["median"]
    lines = [
        f"Instructions per request (callgrind, user space, idle background subtracted; median of "
        f"{instr['phases']} phases of {instr['requests']} requests over {instr['connections']} keep-alive "
        "connections; `bench/run --instructions`, method in bench/instructions.py):",
        "",
        "| system | instructions / request | added over bare | ratio bare / system | spread |",
        "|---|---:|---:|---:|---:|",
    ]
    for system, row in systems.items():
        added = "–" if system == "bare" else f"{row['median'] - bare:,.0f}"
        lines.append(f"| {LABELS[system]} | {row['median']:,.0f} | {added} | {bare / row['median']:.3f} | "
                     f"{row['spread'] * 100:.2f} % |")
    return "\n".join(lines)


BEGIN = "<!-- instructions:begin (bench/run --instructions writes this section) -->"
END = "<!-- instructions:end -->"


def write_docs(instr: dict[str, Any], stamp: str) -> None:
    """Replace the instructions section of docs/benchmarks.md (added at the end if missing)."""
    section = f"{BEGIN}\n### Instructions per request ({stamp})\n\n{render(instr)}\n{END}"
    with open(report.DOC) as file:
        text = file.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    with open(report.DOC, "w") as file:
        file.write(text)
