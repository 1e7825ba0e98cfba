"""A config file written to stall or crash the loader (issue 15): each is refused with
`FILE:LINE: path: problem` or a one-line reason, never a traceback or a hang.

The CLI tests run `gateway check-config` as a subprocess with a timeout: a hang fails them, and
the answer must be the one line on stderr (no traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.loader import MAX_CONFIG_BYTES, ConfigError, load_config, load_config_text
from tests.support.processes import ROOT

HUGE = "9" * 5000  # past Python's 4,300-digit int conversion limit
SHOWN = f'"{"9" * 80}…" (5000 characters)'

BASE = """\
listen: 127.0.0.1:{port}
upstream:
  url: http://127.0.0.1:9000
keys:
  - id: alice
    key: alice-demo-key
    plan: free
    limits: {{rpm: {override}}}
plans:
  free:
    limits:
      rpm: {{rate: {rate}/1m}}
      requests: {{concurrency: {concurrency}}}
routes:
  - path: /v1/**
    limits: [rpm, requests]
bans: {{strikes: {strikes}, ipv6_prefix: {ipv6_prefix}}}
"""
SANE = {"port": "8080", "override": "5", "rate": "10", "concurrency": "2", "strikes": "3", "ipv6_prefix": "64"}


def merge_bomb(levels: int) -> str:
    """The issue's file: each anchor merges the previous one ten times (710 bytes at 9 levels)."""
    lines = ["a0: &a0 {x: 1}"]
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} {{<<: [{', '.join([f'*a{level - 1}'] * 10)}]}}")
    return "\n".join(lines) + f"\n<<: *a{levels}\n"


def problems_of(text: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "t.yaml", **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


def within(seconds: float, call: Callable[[], object]) -> object:
    """Run `call` in a thread; fail (not hang) when it has not answered in `seconds`."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds}s"
    return result[0]


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:  # returned for the test to inspect
        return exc


# -- the merge bomb ------------------------------------------------------------------------------


def test_the_merge_bomb_is_refused_at_the_line_where_it_passes_the_limit() -> None:
    text = merge_bomb(9)
    assert len(text.encode()) < 800
    outcome = within(10, lambda: load_config_text(text, "t.yaml"))
    assert isinstance(outcome, ConfigError)
    # 10**6 merged nodes at a6 (line 7) is the first level past the limit
    assert outcome.problems == [
        "t.yaml:7: aliases and merge keys expand the document past 1,000,000 extra nodes;"
        " write the values out or merge less"
    ]


def test_merges_within_the_limit_still_work() -> None:
    text = BASE.format(**SANE).replace("plans:\n  free:\n", "plans:\n  free:\n    <<: *extra\n")
    text = "x_defaults: &extra {limits: {rpm: {rate: 3/1s}}}\n" + text
    problems = problems_of(text)
    assert problems == ["t.yaml:1: x_defaults: unknown key"]  # the merge itself was read


# -- integers past the conversion limit, in every kind of field ---------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("override", f"t.yaml:8: keys[0].limits.rpm: {SHOWN} is too large"),
        ("rate", f't.yaml:12: plans.free.limits.rpm.rate: "{"9" * 80}…" (5003 characters):'
                 " the number of requests is too large (at most 999999999999999)"),
        ("concurrency", f"t.yaml:13: plans.free.limits.requests.concurrency: {SHOWN} is too large"),
        ("strikes", f"t.yaml:17: bans.strikes: {SHOWN} is too large"),
        ("ipv6_prefix", f"t.yaml:17: bans.ipv6_prefix: {SHOWN} is too large"),
        ("port", f't.yaml:1: listen: "127.0.0.1:{"9" * 70}…" (5010 characters):'
                 " the port must be a number from 0 to 65535"),
    ],
)
def test_a_huge_integer_is_a_located_problem(field: str, expected: str) -> None:
    text = BASE.format(**{**SANE, field: HUGE})
    assert problems_of(text) == [expected]


@pytest.mark.parametrize("name", ["listen", "admin_listen"])
def test_a_huge_port_in_an_override_is_a_located_problem(name: str) -> None:
    problems = problems_of(BASE.format(**SANE), overrides={name: f"127.0.0.1:{HUGE}"})
    assert problems == [
        f't.yaml:override: {name}: "127.0.0.1:{"9" * 70}…" (5010 characters):'
        " the port must be a number from 0 to 65535"
    ]


def test_a_huge_float_is_too_large_not_infinite() -> None:
    text = BASE.format(**SANE).replace("ipv6_prefix: 64}", "ipv6_prefix: 64, factor: " + HUGE + ".5}")
    assert problems_of(text) == [f't.yaml:17: bans.factor: "{"9" * 80}…" (5002 characters) is too large']


# -- files that are not config files --------------------------------------------------------------


def test_dev_zero_is_refused_before_reading() -> None:
    outcome = within(10, lambda: load_config("/dev/zero"))
    assert isinstance(outcome, ConfigError)
    assert outcome.problems == ["/dev/zero: not a regular file (a character device); give the path of a YAML file"]


def test_a_fifo_with_no_writer_is_refused_not_waited_for(tmp_path: Path) -> None:
    fifo = tmp_path / "gateway.yaml"
    os.mkfifo(fifo)
    outcome = within(10, lambda: load_config(fifo))
    assert isinstance(outcome, ConfigError)
    assert outcome.problems == [f"{fifo}: not a regular file (a FIFO); give the path of a YAML file"]


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.problems == [f"{tmp_path}: not a regular file (a directory); give the path of a YAML file"]


def test_a_file_over_the_size_cap_is_refused_without_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(BASE.format(**SANE) + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError) as caught:
        load_config(big)
    assert caught.value.problems == [f"{big}: the file is larger than 8 MiB, the most a config may be"]


def test_a_file_at_the_size_cap_is_read(tmp_path: Path) -> None:
    text = BASE.format(**SANE)
    exact = tmp_path / "exact.yaml"
    exact.write_text(text + "#" * (MAX_CONFIG_BYTES - len(text.encode())))
    assert load_config(exact).keys[0].id == "alice"


def test_a_symlink_to_a_regular_file_is_fine(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text(BASE.format(**SANE))
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert load_config(link).listen == "127.0.0.1:8080"


# -- the same, through `gateway check-config` ------------------------------------------------------


def check_config(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=20)


def hostile_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, the start of the one line check-config must print)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(merge_bomb(9))
    huge = tmp_path / "huge.yaml"
    huge.write_text(BASE.format(**{**SANE, "concurrency": HUGE}))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    return {
        "merge bomb": (str(bomb), f"{bomb}:7: aliases and merge keys expand the document past"),
        "huge integer": (str(huge), f"{huge}:13: plans.free.limits.requests.concurrency: "),
        "/dev/zero": ("/dev/zero", "/dev/zero: not a regular file (a character device)"),
        "fifo": (str(fifo), f"{fifo}: not a regular file (a FIFO)"),
        "too big": (str(big), f"{big}: the file is larger than 8 MiB"),
    }


@pytest.mark.parametrize("name", ["merge bomb", "huge integer", "/dev/zero", "fifo", "too big"])
def test_check_config_answers_a_hostile_file_in_one_line(tmp_path: Path, name: str) -> None:
    path, start = hostile_files(tmp_path)[name]
    result = check_config(path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(start), result.stderr


# -- fuzz: whatever the file, only ConfigErrors with locations ------------------------------------

_LOCATED = r"^t\.yaml(:\d+|:override)?: "

_fragments = st.sampled_from([
    "listen: ", "admin_listen: ", "upstream:\n  url: ", "keys:\n  - id: a\n    key: k\n    plan: ",
    "plans:\n  p:\n    limits:\n      r: {rate: ", "concurrency: ", "bans: {strikes: ", "ipv6_prefix: ",
    "routes:\n  - path: ", "<<: ", "&a ", "*a", "[", "]", "{", "}", ", ", ": ", "\n", "  ", "- ",
    "${X}", "${X:-", "!!python/object:os.system ", "!!binary ", "'", '"', "#", "---\n", "?", "|\n",
    "9" * 5000, "1e999", "-1", "0", "127.0.0.1:", "[::1]:", "/1m", "1d", "10MB", "\t", "\x00", "\ufeff",
])


_values = st.one_of(
    st.sampled_from(["9" * 5000, "-" + "9" * 5000, "0" * 5000 + "1", "1e999", "nan", "-1", "0", "0x10", "1_000",
                     "~", "''", "[]", "{}", "*a", "&a 1", "!!int 1", "!!float 1", "${X:-9}", "1.5", "+7"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r{}[],#"), max_size=12),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.fixed_dictionaries({name: st.one_of(st.just(value), _values) for name, value in SANE.items()})
    .map(lambda fields: BASE.format(**fields)),
    st.lists(_fragments, max_size=40).map("".join),
    st.builds(lambda base, cut, extra: base[:cut] + extra + base[cut:],
              st.just(BASE.format(**SANE)), st.integers(0, len(BASE)), st.lists(_fragments, max_size=6).map("".join)),
))
def test_fuzz_the_loader_gives_only_located_config_errors(text: str) -> None:
    import re

    try:
        load_config_text(text, "t.yaml", env={})
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert re.match(_LOCATED, problem), problem
            assert "\n" not in problem


def test_leading_zeros_do_not_count_toward_the_size_of_an_integer() -> None:
    config = load_config_text(BASE.format(**{**SANE, "concurrency": "0" * 5000 + "3"}), "t.yaml")
    assert config.plans["free"].limits["requests"].limit == 3


@pytest.mark.parametrize("flag", ["--listen", "--admin-listen"])
def test_serve_answers_a_huge_port_on_the_command_line_in_one_line(tmp_path: Path, flag: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(BASE.format(**SANE))
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "-c", str(config), flag, f"127.0.0.1:{HUGE}"],
                            capture_output=True, text=True, cwd=ROOT, timeout=20)
    assert result.returncode == 1
    name = flag.removeprefix("--").replace("-", "_")
    assert result.stderr.startswith(f"gateway: invalid config: {config}:override: {name}: ") and \
        result.stderr.count("\n") == 1, result.stderr
