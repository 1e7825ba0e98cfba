"""Process plumbing for the harness: start, wait for, pin, measure and stop the processes it owns.

Every process is started in its own session, so stopping one stops its whole tree (nginx's
workers, the gateway's worker processes) by its own process-group id, never by name.
CPU time comes from /proc/<pid>/stat (utime + stime) summed over the process tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ALL_CPUS = f"0-{CPUS - 1}"


def pinned(cpus: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` under `taskset -c cpus`; None means every CPU, said explicitly, because children
    inherit the affinity of the harness (which bench/run pins to the load generator's CPU)."""
    return ["taskset", "-c", cpus or ALL_CPUS, *argv]


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                found.extend(int(c) for c in file.read().split())
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(children(current))
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command name: state is fields[0]; utime and stime are stat fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu(pid: int) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in tree(pid)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `tree_cpu` samples (processes born in between count whole)."""
    return sum(after[p] - before.get(p, 0.0) for p in after)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: str
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    stdout_path: str | None = None
    _files: list[object] = field(default_factory=list)

    def start(self) -> Proc:
        log = open(self.log_path, "ab")
        out = open(self.stdout_path, "ab") if self.stdout_path else subprocess.DEVNULL
        self._files = [log, out]
        self.popen = subprocess.Popen(
            self.argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True, env=self.env,
        )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cpu(self) -> dict[int, float]:
        return tree_cpu(self.pid)

    def stop(self, grace: float = 5.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            self._close()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        # stragglers of the group (workers that outlived their parent)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._close()

    def _close(self) -> None:
        for file in self._files:
            with contextlib.suppress(Exception):
                file.close()  # type: ignore[attr-defined]
        self._files = []

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as file:
                return "".join(file.readlines()[-lines:])
        except OSError:
            return ""


def wait_port(port: int, proc: Proc | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited during startup:\n{proc.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening after {timeout}s" + (f":\n{proc.log_tail()}" if proc else ""))


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@contextlib.contextmanager
def owned(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()
