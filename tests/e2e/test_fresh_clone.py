"""A new user's first hour, from a fresh clone of this repository's HEAD:

- README.md gives exactly two set-up commands (run the gateway, run the tests);
- every relative link in README.md and docs/*.md resolves to a file inside the clone, and no
  tracked file names a path outside the repository (the team's notes, one level up);
- the run command, `scripts/quickstart`, starts, answers README's curl examples as README says
  (run as written, through bash and curl, on ports moved by the documented variables), and
  stops cleanly on SIGINT (Ctrl+C), taking both its processes with it.

Shortcut, to keep this fast and offline: the clone's `.venv` is a link to this worktree's, whose
editable install was made from the same pyproject.toml; the test writes the quickstart's
install stamp for it (so the script skips `pip install`, as it does on a second run) and puts
the clone first on PYTHONPATH, so the clone's code is what runs. When the worktree's
pyproject.toml differs from HEAD's, the venv is not the one HEAD would build: the run part skips.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ROOT
from tests.support.redis_server import free_port

pytestmark = pytest.mark.e2e

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fresh") / "gateway"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(target)], check=True)
    subprocess.run(["git", "checkout", "--quiet", "--detach", head.stdout.strip()], cwd=target, check=True)
    return target


def sh_blocks(markdown: str, heading: str) -> list[str]:
    """The ```sh blocks of one `## heading` section."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_readme_gives_two_setup_commands(clone: Path) -> None:
    readme = (clone / "README.md").read_text()
    assert sh_blocks(readme, "Try it (one command)")[0].strip() == "scripts/quickstart"
    assert sh_blocks(readme, "Run the tests (one command)") == ["scripts/test\n"]
    for script in ("scripts/quickstart", "scripts/test"):
        assert os.access(clone / script, os.X_OK)


def test_every_relative_link_resolves_inside_the_repository(clone: Path) -> None:
    documents = [clone / "README.md", *sorted((clone / "docs").glob("*.md"))]
    checked = 0
    for document in documents:
        for target in LINK.findall(document.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = (document.parent / target.split("#", 1)[0]).resolve()
            assert path.is_relative_to(clone.resolve()), f"{document.name}: {target} leaves the repository"
            assert path.exists(), f"{document.name}: {target} does not exist"
            checked += 1
    assert checked >= 20
    notes = "shared"  # spelled apart, so that this file does not find itself
    outside = subprocess.run(["git", "grep", "-n", "-e", f"\\.\\./{notes}/", "-e", f"/work/{notes}"], cwd=clone,
                             capture_output=True, text=True)
    assert outside.stdout == "", f"files pointing outside the repository:\n{outside.stdout}"


def test_package_data_matches_the_tree(clone: Path) -> None:
    """Every package-data pattern of pyproject.toml names files that exist in the clone."""
    import tomllib

    package_data = tomllib.loads((clone / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert package_data
    for package, patterns in package_data.items():
        for pattern in patterns:
            assert list((clone / package.replace(".", "/")).glob(pattern)), f"{package}: {pattern} matches nothing"


def test_tests_write_no_loose_files_in_tmp(clone: Path) -> None:
    """Test logs go under pytest's tmp_path (tests/support/processes.py LOG_DIR), not /tmp."""
    loose = subprocess.run(["git", "grep", "-n", "-E", r"""Path\(f?["']/tmp/""", "--", "tests"], cwd=clone,
                           capture_output=True, text=True)
    assert loose.stdout == "", loose.stdout


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, one entry per command line."""
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_quickstart_from_a_fresh_clone(clone: Path, tmp_path: Path) -> None:
    if shutil.which("curl") is None:  # README's examples are curl commands, run as written
        if os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1":
            pytest.fail("GATEWAY_REQUIRE_TOOLS=1 but curl is not installed")
        pytest.skip("curl is not installed; GATEWAY_REQUIRE_TOOLS=1 makes this a failure")
    pyproject = (clone / "pyproject.toml").read_bytes()
    if pyproject != (ROOT / "pyproject.toml").read_bytes():
        pytest.skip("the worktree's pyproject.toml differs from HEAD's: its .venv is not HEAD's")
    (clone / ".venv").symlink_to(ROOT / ".venv")
    (ROOT / ".venv" / ".installed-pyproject").write_text(hashlib.sha256(pyproject).hexdigest() + "\n")
    ports = {"upstream": free_port(), "gateway": free_port(), "admin": free_port()}
    env = {**os.environ, "PYTHONPATH": str(clone), "UPSTREAM_LISTEN": f"127.0.0.1:{ports['upstream']}",
           "GATEWAY_LISTEN": f"127.0.0.1:{ports['gateway']}", "GATEWAY_ADMIN_LISTEN": f"127.0.0.1:{ports['admin']}"}
    where = subprocess.run([str(clone / ".venv/bin/python"), "-c", "import gateway; print(gateway.__file__)"],
                           env=env, cwd=clone, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(clone)), where.stdout  # the clone's code runs, not the worktree's

    log_path = tmp_path / "quickstart.log"
    with open(log_path, "wb") as log:
        quickstart = subprocess.Popen(["scripts/quickstart"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert quickstart.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{ports['admin']}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert "pip" not in log_path.read_text()  # the stamp matched: no reinstall

        readme = (clone / "README.md").read_text()
        examples = commands(sh_blocks(readme, "Try it (one command)")[1])
        assert len(examples) == 5, examples

        def run(command: str) -> str:
            moved = command.replace("127.0.0.1:8080", f"127.0.0.1:{ports['gateway']}").replace(
                "127.0.0.1:9464", f"127.0.0.1:{ports['admin']}")
            return subprocess.run(["bash", "-c", moved], capture_output=True, text=True, timeout=60).stdout

        first, loop, parallel, bad_key, metrics = examples
        answer = run(first)
        assert answer.startswith("HTTP/1.1 200"), answer
        assert re.search(r"^concurrency-limit: 2\r?$", answer, re.M | re.I)
        assert re.search(r"^ratelimit-policy: .*w=60", answer, re.M | re.I)
        assert "# 200 x4, then 429 x2" in loop
        assert run(loop).split() == ["200"] * 4 + ["429"] * 2
        assert "# 200, 200 and one 429" in parallel
        assert sorted(run(parallel).split()) == ["200", "200", "429"]
        assert "# 401 invalid_api_key" in bad_key
        assert '"error":"invalid_api_key"' in run(bad_key)
        assert 'gateway_requests_total{outcome="rate_limited",plan="free"' in run(metrics)
    finally:
        quickstart.send_signal(signal.SIGINT)  # Ctrl+C
        try:
            code = quickstart.wait(30)
        except subprocess.TimeoutExpired:
            quickstart.kill()
            raise
    log = log_path.read_text()
    assert code == 0, log
    assert log.count("listening on") == 2  # the upstream's line and the gateway's, once each
    assert "stopped (exit code 0)" in log and "Traceback" not in log
    for port in ports.values():  # both processes are gone
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
