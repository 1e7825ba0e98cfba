"""A reload parses the file in a fresh child process (gateway/config/isolated.py), so whatever
the config loader imports is paid on every reload. Found by tests/e2e/test_lifecycle.py
(test_sighup_reloads waits 0.3 s): `gateway.config.cost_rules` importing `gateway.store.base`
pulls in the whole store package and the redis client, and a reload went from ≈ 0.26 s to
≈ 0.5 s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_config_child_imports_no_store_and_no_redis_client() -> None:
    probe = ("import sys, gateway.config.isolated; "
             "print(sorted(m for m in ('redis', 'gateway.store', 'aiohttp', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
