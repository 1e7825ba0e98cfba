"""Load a config in a child process, within a time budget, for reloads on a running gateway.

A reload must never delay a request: parsing a large file holds the interpreter (libyaml's
composer does not release the GIL, so a thread would not help), and a hostile one can ask for
seconds of work or gigabytes of memory. The child runs `load_config` with a memory ceiling and
is killed when the budget runs out; the event loop only waits on a pipe and unpickles the
finished `Config`. The child inherits the environment, so `${VAR}` reads what it would read in
the worker.

Whatever goes wrong (an invalid file, a crash, a kill, the budget) comes back as a ConfigError
with one-line problems.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
from collections.abc import Mapping

from gateway.config.loader import ConfigError, load_config
from gateway.config.model import Config

RELOAD_BUDGET = 30.0  # seconds; 70,000 keys (7.3 MiB) took 7 s to load on a busy 2-core machine
_MEMORY_CEILING = 1024**3  # bytes of address space for the child: a loader past this is refused


async def load_config_isolated(
    path: str, overrides: Mapping[str, str], budget: float = RELOAD_BUDGET
) -> Config:
    """`load_config(path, overrides)` in a child process; ConfigError on any failure."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.config.isolated",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    request = json.dumps({"path": path, "overrides": dict(overrides)}).encode()
    try:
        async with asyncio.timeout(budget):
            out, err = await child.communicate(request)
    except TimeoutError:
        raise ConfigError([f"{path}: loading took longer than {budget:g}s; refused"]) from None
    finally:
        if child.returncode is None:  # the budget ran out, or the reload was cancelled
            child.kill()
            await child.wait()
    if child.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {child.returncode}"
        raise ConfigError([f"{path}: the config loader failed: {reason[:200]}"])
    kind, payload = pickle.loads(out)  # our own child's answer
    if kind == "problems":
        raise ConfigError(payload)
    assert isinstance(payload, Config)
    return payload


def _child() -> int:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_CEILING, _MEMORY_CEILING))
    except (ImportError, ValueError, OSError):
        pass  # no ceiling where the platform has none; the time budget still holds
    request = json.loads(sys.stdin.buffer.read())
    answer: tuple[str, object]
    try:
        answer = ("config", load_config(request["path"], request["overrides"]))
    except ConfigError as exc:
        answer = ("problems", exc.problems)
    except MemoryError:
        answer = ("problems", [f"{request['path']}: loading needs more than {_MEMORY_CEILING // 1024**2} MiB; refused"])
    sys.stdout.buffer.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
