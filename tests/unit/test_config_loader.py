"""The YAML loader (SPEC §3): valid configs give the expected frozen model, invalid ones give every
problem as `FILE:LINE: dotted.path: problem`.

Failure cases live in tests/data/config/*.yaml, one file per rule, each ending with the exact
problem lines it must produce (`# expect: LINE: path: problem`), in the manner of
envoyproxy/ratelimit's test/config/*.yaml.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission.buckets import build_plan
from gateway.config.loader import ConfigError, load_config, load_config_text
from gateway.config.model import (
    HEADER_FAMILIES,
    Bans,
    ConcurrencyLimit,
    Config,
    Identity,
    QuotaLimit,
    RateLimit,
    Store,
)
from gateway.config.summary import summarize
from gateway.store.base import Charge
from tests.support.config_texts import minimal_config

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "config"
EXAMPLES = ROOT / "config"
FAILURE_CASES = sorted(path for path in DATA.glob("*.yaml") if not path.name.startswith("valid_"))

MINIMAL = minimal_config("rpm: {rate: 10/1m}", "requests: {concurrency: 2}",
                         routes="  - path: /v1/**\n    limits: [rpm, requests]\n")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def problems_of(text: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "t.yaml", **kwargs)  # type: ignore[arg-type]
    return caught.value.problems


# -- one YAML file per failure -------------------------------------------------------------------


def test_there_is_a_failure_case_per_rule() -> None:
    assert len(FAILURE_CASES) >= 70


@pytest.mark.parametrize("path", FAILURE_CASES, ids=lambda path: path.stem)
def test_failure_case_reports_exactly_its_problems(path: Path) -> None:
    expected = [
        f"{path}:{line.removeprefix('# expect: ')}"
        for line in path.read_text().splitlines()
        if line.startswith("# expect: ")
    ]
    assert expected, f"{path.name} declares no '# expect:' line"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == expected
    assert str(caught.value) == "\n".join(expected)


def test_the_rate_example_of_the_brief_is_reported_verbatim() -> None:
    text = MINIMAL.replace("rpm: {rate: 10/1m}", "rpm: {rate: 60/1x}")
    assert problems_of(text) == [
        't.yaml:10: plans.free.limits.rpm.rate: "60/1x" is not a rate (N/DURATION, e.g. 60/1m)'
    ]


# -- reading files -------------------------------------------------------------------------------


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: cannot read the file: No such file or directory"]


def test_an_empty_file_is_an_error_on_line_1(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}:1: the file is empty; expected a mapping of settings"]


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"upstream:\n  url: http://caf\xe9.example\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}:2: the file is not UTF-8 text"]


def test_a_path_object_and_a_string_both_work() -> None:
    assert load_config(DATA / "valid_minimal.yaml").source == str(DATA / "valid_minimal.yaml")
    assert load_config(str(DATA / "valid_minimal.yaml")).keys[0].id == "alice"


# -- valid configs give the model ----------------------------------------------------------------


def test_minimal_config_gets_every_default() -> None:
    config = load_config(DATA / "valid_minimal.yaml", env={})
    assert config.listen == "0.0.0.0:8080"
    assert config.admin_listen == "127.0.0.1:9464"
    assert config.admin_token is None
    assert config.shutdown_grace == 20.0
    assert config.upstream.url == "http://127.0.0.1:9000"
    assert config.upstream.client == "aiohttp"
    assert (config.upstream.connect_timeout, config.upstream.timeout) == (5.0, 300.0)
    assert config.upstream.max_connections == 512
    assert config.upstream.set_headers == ()
    assert (config.upstream.key_id_header, config.upstream.plan_header) == (
        "X-Gateway-Key-Id",
        "X-Gateway-Plan",
    )
    assert config.store == Store(url="memory://", prefix="gw", timeout=0.1, on_error="local", lease=30.0)
    assert config.identity == Identity(
        api_key_headers=("X-API-Key", "Authorization"), api_key_query="apikey", trusted_proxies=()
    )
    assert config.max_request_body == 10 * 1024 * 1024
    assert config.bans is None
    assert config.headers == frozenset(HEADER_FAMILIES)
    assert config.plans["free"].limits["rpm"] == RateLimit(name="rpm", limit=10, window=60.0)
    route = config.routes[0]
    assert (route.path, route.methods, route.limits, route.per_route, route.job) == (
        "/v1/**",
        None,
        ("rpm",),
        frozenset(),
        None,
    )


def test_full_config_values() -> None:
    config = load_config(DATA / "valid_full.yaml", env={})
    assert config.listen == "[::1]:8081"
    assert config.admin_listen == "127.0.0.1:9465"
    assert config.admin_token is None  # ${TEST_ADMIN_TOKEN:-} with nothing set
    assert config.shutdown_grace == 0.0

    upstream = config.upstream
    assert upstream.url == "https://api.example.com:8443/base"  # trailing slash stripped
    assert upstream.client == "httpx"
    assert (upstream.connect_timeout, upstream.timeout) == (1.5, 120.0)
    assert upstream.max_connections == 64
    assert upstream.set_headers == (("X-Static", "yes"),)  # the empty token header is left out
    assert (upstream.key_id_header, upstream.plan_header) == ("X-Caller-Id", "X-Caller-Plan")

    assert config.store == Store(
        url="redis://:s3cret@127.0.0.1:6379/2", prefix="gw-test", timeout=0.25, on_error="deny", lease=60.0
    )
    assert config.identity == Identity(
        api_key_headers=("X-Key",),
        api_key_query=None,
        trusted_proxies=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.168.1.7/32"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
    )

    acme, hobbyist = config.keys
    assert acme.id == "acme-live"
    assert acme.sha256 == sha256("acme-live-demo-key")  # upper-case hex normalised
    assert (acme.plan, acme.workspace, dict(acme.overrides)) == ("pro", "acme", {"rpm": 30, "requests": 4})
    assert hobbyist.sha256 == sha256("free-demo-key")
    assert (hobbyist.workspace, dict(hobbyist.overrides)) == (None, {})

    assert list(config.plans) == ["free", "pro"]
    free, pro = config.plans["free"], config.plans["pro"]
    assert free.limits["rpm"] == RateLimit(name="rpm", limit=10, window=60.0, scope="key", exact=True)
    assert free.limits["crawls"] == ConcurrencyLimit(name="crawls", limit=1, scope="key", wait=0.5)
    assert pro.limits["rpm"] == RateLimit(name="rpm", limit=60, window=60.0, scope="workspace", exact=False)
    assert pro.limits["requests"] == ConcurrencyLimit(name="requests", limit=10, scope="workspace", wait=2.0)
    # a YAML merge key: the explicit `concurrency: 5` wins over the merged 1, `wait` comes through
    assert pro.limits["crawls"] == ConcurrencyLimit(name="crawls", limit=5, scope="key", wait=0.5)

    crawl, status, rest = config.routes
    assert crawl.methods == frozenset({"POST"})  # upper-cased
    assert (crawl.limits, crawl.per_route) == (("rpm",), frozenset({"crawls"}))
    assert crawl.job is not None
    assert (crawl.job.limit, crawl.job.id_path, crawl.job.status_path) == (
        "crawls",
        "data.job_id",
        "/v1/crawl/{id}",
    )
    assert (crawl.job.status_field, crawl.job.done, crawl.job.max_duration) == (
        "state",
        ("done", "error"),
        1800.0,
    )
    assert (status.path, status.methods) == ("/v1/crawl/{id}", frozenset({"GET", "DELETE"}))
    assert (rest.path, rest.methods, rest.limits) == ("/v1/**", None, ("rpm", "requests"))

    assert config.max_request_body == 512 * 1024
    assert config.bans == Bans(
        strikes=5,
        within=30.0,
        duration=60.0,
        factor=1.5,
        max_duration=3600.0,
        remember=7200.0,
        allow=(ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        ipv6_prefix=56,
    )
    assert config.headers == frozenset({"ietf", "x-ratelimit"})


def test_the_model_never_keeps_a_plain_key() -> None:
    config = load_config(DATA / "valid_full.yaml", env={})
    assert "free-demo-key" not in repr(config)


def test_job_defaults() -> None:
    text = MINIMAL.replace(
        "  - path: /v1/**\n",
        "  - path: /v1/crawl\n"
        "    job: {limit: requests, id: id, status_path: '/v1/crawl/{id}'}\n"
        "  - path: /v1/**\n",
    )
    job = load_config_text(text, "t.yaml").routes[0].job
    assert job is not None
    assert (job.status_field, job.done, job.max_duration) == (
        "status",
        ("completed", "failed", "cancelled"),
        7200.0,
    )
    assert load_config_text(text, "t.yaml").routes[0].limits == ()  # limits default to none: auth only


def test_empty_bans_section_turns_banning_on_with_defaults() -> None:
    config = load_config_text(MINIMAL + "bans: {}\n", "t.yaml")
    assert config.bans == Bans()
    assert config.bans.allow == ()


def test_empty_headers_list_emits_no_header_family() -> None:
    assert load_config_text(MINIMAL + "headers: []\n", "t.yaml").headers == frozenset()


def test_api_key_query_can_be_disabled_with_an_empty_string() -> None:
    config = load_config_text(MINIMAL + 'identity: {api_key_query: ""}\n', "t.yaml")
    assert config.identity.api_key_query is None
    assert config.identity.api_key_headers == ("X-API-Key", "Authorization")


def test_values_are_taken_as_written_where_a_string_is_expected() -> None:
    """YAML 1.1 would read `2024` as an int and `no` as false; ids and statuses keep the text."""
    text = (
        MINIMAL.replace("    plan: free\n", "    plan: free\n    workspace: 2024\n")
        .replace("  - id: alice\n", "  - id: 007\n")
        .replace(
            "  - path: /v1/**\n",
            "  - path: /v1/crawl\n"
            "    job: {limit: requests, id: id, status_path: '/v1/crawl/{id}', done: [no, off]}\n"
            "  - path: /v1/**\n",
        )
    )
    config = load_config_text(text, "t.yaml")
    assert (config.keys[0].id, config.keys[0].workspace) == ("007", "2024")
    assert config.routes[0].job is not None and config.routes[0].job.done == ("no", "off")


def test_ints_and_floats_in_yaml_are_accepted_as_seconds() -> None:
    text = MINIMAL + "shutdown_grace: 2.5\nstore: {timeout: 1, lease: 90}\n"
    config = load_config_text(text, "t.yaml")
    assert (config.shutdown_grace, config.store.timeout, config.store.lease) == (2.5, 1.0, 90.0)


def test_the_top_level_mapping_is_frozen() -> None:
    config = load_config(DATA / "valid_minimal.yaml")
    with pytest.raises(AttributeError):
        config.listen = "x"  # type: ignore[misc]


# -- overrides -----------------------------------------------------------------------------------


def test_overrides_replace_values_before_validation() -> None:
    overrides = {
        "listen": "127.0.0.1:8080",
        "admin_listen": "127.0.0.1:9999",
        "store.url": "redis://r:6379/1",
    }
    config = load_config(DATA / "valid_full.yaml", overrides=overrides, env={})
    assert (config.listen, config.admin_listen) == ("127.0.0.1:8080", "127.0.0.1:9999")
    assert config.store.url == "redis://r:6379/1"
    assert config.store.prefix == "gw-test"  # the rest of the section stays


def test_overrides_create_missing_sections() -> None:
    config = load_config(DATA / "valid_minimal.yaml", overrides={"store.url": "redis://r:6379/0"}, env={})
    assert config.store.url == "redis://r:6379/0"
    assert config.store.prefix == "gw"


def test_a_wrong_override_is_reported_as_such() -> None:
    path = DATA / "valid_minimal.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides={"listen": "nowhere", "store.ur": "redis://x"}, env={})
    assert caught.value.problems == [
        f'{path}:override: listen: "nowhere" is not HOST:PORT (e.g. 0.0.0.0:8080 or [::1]:8080)',
        f'{path}:override: store.ur: unknown key (did you mean "url"?)',
    ]


def test_overrides_are_not_interpolated() -> None:
    config = load_config_text(MINIMAL, "t.yaml", overrides={"admin_token": "${NOT_A_VAR}"}, env={})
    assert config.admin_token == "${NOT_A_VAR}"


def test_override_clashing_listen_addresses() -> None:
    problems = problems_of(MINIMAL, overrides={"listen": "127.0.0.1:9464"})
    assert problems == [
        't.yaml:override: admin_listen: "127.0.0.1:9464" clashes with listen "127.0.0.1:9464";'
        " they must differ"
    ]


def test_an_invalid_listen_is_not_also_reported_as_a_clash() -> None:
    assert problems_of(MINIMAL + "listen: bad\nadmin_listen: 0.0.0.0:8080\n") == [
        't.yaml:15: listen: "bad" is not HOST:PORT (e.g. 0.0.0.0:8080 or [::1]:8080)'
    ]


def test_wildcard_host_clashes_with_any_host_on_the_same_port() -> None:
    assert problems_of(MINIMAL + "listen: '[::]:9000'\nadmin_listen: 10.1.2.3:9000\n") == [
        't.yaml:16: admin_listen: "10.1.2.3:9000" clashes with listen "[::]:9000"; they must differ'
    ]
    config = load_config_text(  # (admin_open: a non-loopback admin port needs a token or the opt-out)
        MINIMAL + "listen: 10.0.0.1:9000\nadmin_listen: 10.0.0.2:9000\nadmin_open: true\n", "t.yaml"
    )
    assert config.admin_listen == "10.0.0.2:9000"


def test_port_zero_never_clashes() -> None:
    config = load_config_text(
        MINIMAL, "t.yaml", overrides={"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}
    )
    assert (config.listen, config.admin_listen) == ("127.0.0.1:0", "127.0.0.1:0")


# -- environment interpolation -------------------------------------------------------------------


def test_env_variable_is_substituted() -> None:
    text = MINIMAL + "store:\n  url: ${REDIS_URL}\n  prefix: gw-${ENVIRONMENT:-dev}-x\n"
    config = load_config_text(
        text, "t.yaml", env={"REDIS_URL": "redis://cache:6379/3", "ENVIRONMENT": "prod"}
    )
    assert (config.store.url, config.store.prefix) == ("redis://cache:6379/3", "gw-prod-x")


def test_env_default_applies_when_unset_or_empty() -> None:
    text = MINIMAL + "store:\n  prefix: ${PREFIX:-fallback}\n"
    assert load_config_text(text, "t.yaml", env={}).store.prefix == "fallback"
    assert load_config_text(text, "t.yaml", env={"PREFIX": ""}).store.prefix == "fallback"


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TEST_TOKEN_FROM_ENV", "tok-123")
    config = load_config_text(MINIMAL + "admin_token: ${GATEWAY_TEST_TOKEN_FROM_ENV}\n", "t.yaml")
    assert config.admin_token == "tok-123"


def test_unset_variable_without_default_is_an_error_naming_it() -> None:
    assert problems_of(MINIMAL + "admin_token: ${ADMIN_TOKEN}\n", env={}) == [
        "t.yaml:15: admin_token: environment variable ADMIN_TOKEN is not set "
        "(${ADMIN_TOKEN:-default} gives a default)"
    ]


def test_empty_default_gives_an_empty_value() -> None:
    config = load_config_text(MINIMAL + "admin_token: ${ADMIN_TOKEN:-}\n", "t.yaml", env={})
    assert config.admin_token is None
    config = load_config_text(
        MINIMAL + "admin_token: ${ADMIN_TOKEN:-}\n", "t.yaml", env={"ADMIN_TOKEN": "s3"}
    )
    assert config.admin_token == "s3"


def test_double_dollar_brace_is_a_literal() -> None:
    config = load_config_text(MINIMAL + "admin_token: pa$$word-$${NOT_A_VAR}\n", "t.yaml", env={})
    assert config.admin_token == "pa$$word-${NOT_A_VAR}"


def test_env_values_cannot_inject_yaml() -> None:
    value = "x\nkeys: []\n[1, 2]"
    text = MINIMAL.replace(
        "url: http://127.0.0.1:9000", "url: http://127.0.0.1:9000\n  set_headers: {X-A: '${V}'}"
    )
    problems = problems_of(text, env={"V": value})
    assert problems == [
        "t.yaml:3: upstream.set_headers.X-A:"
        " must be printable ASCII (no CR, LF, NUL or other control characters)"
    ]
    config = load_config_text(MINIMAL + "admin_token: ${V}\n", "t.yaml", env={"V": "[a,b]"})
    assert config.admin_token == "[a,b]"  # a string, not a list


def test_interpolated_numbers_and_booleans_are_read_as_written() -> None:
    text = MINIMAL.replace("rpm: {rate: 10/1m}", "rpm: {rate: '${RATE}', exact: '${EXACT}'}").replace(
        "requests: {concurrency: 2}",
        "requests: {concurrency: '${SLOTS}'}",  # in a flow mapping `{` must be quoted
    )
    config = load_config_text(text, "t.yaml", env={"RATE": "25/10s", "EXACT": "false", "SLOTS": "7"})
    assert config.plans["free"].limits["rpm"] == RateLimit(name="rpm", limit=25, window=10.0, exact=False)
    assert config.plans["free"].limits["requests"] == ConcurrencyLimit(name="requests", limit=7)


def test_mapping_keys_are_not_interpolated() -> None:
    text = MINIMAL.replace("  free:\n", "  ${PLAN}:\n")
    problems = problems_of(text, env={"PLAN": "free"})
    assert 't.yaml:6: keys[0].plan: unknown plan "free"' in problems


# -- YAML safety ---------------------------------------------------------------------------------


def test_python_tags_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]"
    problems = problems_of(MINIMAL + f"admin_token: {payload}\n")
    assert problems == [
        't.yaml:15: admin_token: unsupported YAML tag "!!python/object/apply:pathlib.Path.touch"'
    ]
    assert not marker.exists()


def test_alias_bomb_is_refused_where_it_passes_the_limit() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [{', '.join(['*' + previous] * 9)}]\n"
    text = "lol:\n" + "".join("  " + line + "\n" for line in bomb.splitlines()) + "keys: *i\n"
    # 9**7 = 4.8 million nodes at level g (line 8): past the limit, whether read or not
    assert problems_of(text) == [
        "t.yaml:8: aliases and merge keys expand the document past 1,000,000 extra nodes;"
        " write the values out or merge less"
    ]


def test_recursive_aliases_terminate() -> None:
    problems = problems_of("plans: &p {free: *p}\n" + MINIMAL.split("plans:")[0] + "routes: [{path: /}]\n")
    assert problems == ["t.yaml:1: plans.free.free: unknown key"]
    problems = problems_of("upstream: &u {<<: *u, url: 'http://x'}\nkeys: []\nplans: {}\nroutes: []\n")
    assert "t.yaml:2: keys: must list at least one key" in problems


def test_deep_nesting_is_a_config_error() -> None:
    assert problems_of("upstream: " + "[" * 1000) == ["t.yaml:1: invalid YAML: nested too deeply"]


def test_several_documents_are_refused() -> None:
    assert problems_of(MINIMAL + "---\nlisten: 0.0.0.0:1\n") == [
        "t.yaml:15: invalid YAML:"
        " expected a single document in the stream at line 1, but found another document"
    ]


# -- example configs -----------------------------------------------------------------------------

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_every_profile_has_an_example() -> None:
    names = {path.name for path in EXAMPLE_FILES}
    assert {
        "gateway.yaml",
        "quickstart.yaml",
        "zenrows-style.yaml",
        "cloro-style.yaml",
        "reader-style.yaml",
        "zapfetch-style.yaml",
        "credits.yaml",
    } <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_every_example_config_loads(path: Path) -> None:
    config = load_config(path, env={})
    assert config.keys and config.plans and config.routes
    assert path.read_text().startswith("#"), "each example starts with a comment saying what it reproduces"


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.name)
def test_demo_secrets_in_comments_match_their_digests(path: Path) -> None:
    config = load_config(path, env={})
    documented = dict(re.findall(r'sha256: ([0-9a-fA-F]{64})\s+# sha256 of "([^"]+)"', path.read_text()))
    hashed_keys = [key for key in config.keys if key.sha256 in documented]
    for key in hashed_keys:
        assert sha256(documented[key.sha256]) == key.sha256, key.id
    if path.name != "quickstart.yaml":
        assert len(hashed_keys) == len(config.keys), "every hashed example key documents its demo secret"


def test_quickstart_keys_are_plain_and_limits_small() -> None:
    config = load_config(EXAMPLES / "quickstart.yaml", env={})
    text = (EXAMPLES / "quickstart.yaml").read_text()
    assert not re.search(r"^\s*sha256:", text, re.MULTILINE)
    assert {key.sha256 for key in config.keys} >= {sha256("demo-free-key"), sha256("demo-pro-key")}
    assert config.store.url == "memory://"
    assert (config.listen, config.admin_listen, config.upstream.url) == (
        "127.0.0.1:8080",
        "127.0.0.1:9464",
        "http://127.0.0.1:9000",
    )
    free = config.plans["free"].limits
    assert free["rpm"] == RateLimit(name="rpm", limit=5, window=60.0)
    assert free["requests"] == ConcurrencyLimit(name="requests", limit=2)
    assert [route.path for route in config.routes] == ["/v1/**"]


def test_quickstart_demos_use_separate_keys_and_addresses_come_from_the_environment() -> None:
    """README's rate demo spends demo-free-key's 5 a minute; the concurrency demo's key is another,
    so it never answers rate_limited because of it. scripts/quickstart moves ports by variables."""
    config = load_config(EXAMPLES / "quickstart.yaml", env={})
    plans = {key.id: key.plan for key in config.keys}
    assert plans["demo-free"] != plans["demo-slots"]
    slots = config.plans[plans["demo-slots"]].limits
    assert slots["requests"] == ConcurrencyLimit(name="requests", limit=2)
    assert isinstance(slots["rpm"], RateLimit) and slots["rpm"].limit >= 100
    moved = load_config(EXAMPLES / "quickstart.yaml", env={
        "UPSTREAM_URL": "http://127.0.0.1:9100", "GATEWAY_LISTEN": "127.0.0.1:8180",
        "GATEWAY_ADMIN_LISTEN": "127.0.0.1:9564"})
    assert (moved.upstream.url, moved.listen, moved.admin_listen) == (
        "http://127.0.0.1:9100", "127.0.0.1:8180", "127.0.0.1:9564")


def test_gateway_example_is_the_spec_example() -> None:
    config = load_config(EXAMPLES / "gateway.yaml", env={})
    assert config.upstream.url == "http://127.0.0.1:9000"
    assert config.plans["pro"].limits["rpm"] == RateLimit(
        name="rpm", limit=60, window=60.0, scope="workspace"
    )
    assert config.plans["pro"].limits["requests"] == ConcurrencyLimit(name="requests", limit=10, wait=2.0)
    crawl = config.routes[0]
    assert crawl.per_route == frozenset({"crawl_rps"}) and crawl.job is not None
    assert crawl.job.max_duration == 7200.0
    assert config.bans is not None and config.bans.allow == (ipaddress.ip_network("127.0.0.0/8"),)
    assert all(key.sha256 for key in config.keys) and "key:" not in (EXAMPLES / "gateway.yaml").read_text()


def test_reader_style_has_workspace_rpm_with_a_per_key_override() -> None:
    config = load_config(EXAMPLES / "reader-style.yaml", env={})
    assert config.plans["pro"].limits["rpm"] == RateLimit(
        name="rpm", limit=60, window=60.0, scope="workspace"
    )
    capped = [key for key in config.keys if key.overrides.get("rpm")]
    assert capped and all(key.workspace for key in capped)
    assert [route.job.limit for route in config.routes if route.job] == ["jobs", "jobs"]


def test_cloro_style_keeps_rate_buckets_per_route() -> None:
    config = load_config(EXAMPLES / "cloro-style.yaml", env={})
    assert all("rps" in route.per_route for route in config.routes if "rps" in route.limits)
    assert config.headers == frozenset({"x-concurrent", "x-ratelimit"})


def test_zenrows_style_is_concurrency_only() -> None:
    config = load_config(EXAMPLES / "zenrows-style.yaml", env={})
    for plan in config.plans.values():
        assert all(isinstance(limit, ConcurrencyLimit) and limit.wait == 0 for limit in plan.limits.values())
    assert config.headers == frozenset({"concurrency"}) and config.bans is not None


def test_zapfetch_style_shares_one_budget_and_caps_crawls() -> None:
    config = load_config(EXAMPLES / "zapfetch-style.yaml", env={})
    crawl = config.routes[0]
    assert crawl.limits == ("rps", "crawl_rps") and crawl.per_route == frozenset()
    assert crawl.job is not None and crawl.job.limit == "crawls"
    assert config.plans["starter"].limits["rps"] == RateLimit(name="rps", limit=50, window=1.0)


def test_credits_example_prices_like_the_issue_and_checks() -> None:
    config = load_config(EXAMPLES / "credits.yaml", env={})
    route = config.routes[0]
    developer = config.plans["developer"].limits
    assert developer["credits"] == QuotaLimit("credits", 250_000, "month")
    assert developer["credit_burn"] == RateLimit("credit_burn", 2000, 60.0, counts="cost", shadow=True)
    assert isinstance(developer["slots"], ConcurrencyLimit)
    assert config.upstream.charge == "success_only" and config.usage_path == "/v1/usage"
    key = next(key for key in config.keys if key.plan == "developer")
    pricing = build_plan(config, key, route).pricing
    price = {
        b"": Charge(1, 1), b"js_render=true": Charge(5, 2), b"premium_proxy=true": Charge(10, 1),
        b"premium_proxy=true&js_render=true&url=x": Charge(25, 2), b"js_render=false": Charge(1, 1),
    }
    assert {query: pricing.charge("GET", query, []) for query in price} == price


# -- summary -------------------------------------------------------------------------------------


def test_summary_of_the_spec_example() -> None:
    config = load_config(
        EXAMPLES / "gateway.yaml",
        env={"GATEWAY_STORE_URL": "redis://:hunter2@redis:6379/0", "ADMIN_TOKEN": "t"},
    )
    summary = summarize(config)
    assert "hunter2" not in summary
    assert "store redis://:***@redis:6379/0" in summary
    assert "upstream http://127.0.0.1:9000" in summary
    assert (
        "  pro: rpm 60/1m per workspace, burst 10/1s, crawl_rps 2/1s, requests 10 concurrent (wait 2s),"
        " crawls 5 concurrent"
    ) in summary.splitlines()
    assert any(
        line.startswith("  POST /v1/crawl: rpm, crawl_rps (per route); job holds crawls")
        for line in summary.splitlines()
    )
    assert "  * /v1/**: rpm, burst, requests" in summary.splitlines()
    assert "keys: 4 (2 pro, 1 free, 1 business), 1 workspace, 1 with overrides" in summary.splitlines()
    assert "admin token set" in summary
    assert "acme-live-demo-key" not in summary and config.keys[0].sha256 not in summary


def test_summary_says_which_rate_limits_are_approximate() -> None:
    summary = summarize(load_config(DATA / "valid_full.yaml", env={}))
    assert "rpm 60/1m (approximate: sliding-window counter) per workspace" in summary
    assert "  free: rpm 10/1m," in summary  # an exact limit says nothing


def test_summary_redacts_user_and_password_forms() -> None:
    config = load_config_text(
        MINIMAL + "store: {url: 'rediss://default:pw@r:6380/0?password=pw2'}\n", "t.yaml"
    )
    line = next(line for line in summarize(config).splitlines() if line.startswith("store "))
    assert "pw" not in line.replace("rediss://default:***@r:6380/0?password=***", "")


# -- fuzzing: only ConfigError escapes -----------------------------------------------------------

_LOCATED = re.compile(r"^t\.yaml:(\d+|override): ")
_VOCABULARY = [
    "upstream", "url", "keys", "plans", "routes", "limits", "rate", "concurrency", "scope", "wait",
    "exact", "id", "key", "sha256", "plan", "path", "methods", "job", "status_path", "bans", "headers",
    "store", "identity", "listen", "per_route", "free", "rpm", "requests", "<<",
]  # fmt: skip
_SCALARS = st.one_of(
    st.sampled_from(
        ["10/1m", "0/1s", "5s", "-1", "0", "http://127.0.0.1:9000", "/v1/**", "{id}", "${X}", "${X:-}"]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
_TREES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_VOCABULARY), st.text(max_size=6)), children, max_size=5),
    ),
    max_leaves=25,
)


def _load_or_config_error(text: str) -> None:
    try:
        config = load_config_text(text, "t.yaml", env={"X": "1"})
    except ConfigError as error:
        assert error.problems
        for problem in error.problems:
            assert _LOCATED.match(problem), problem
    else:
        assert isinstance(config, Config)
        assert all(limit.limit > 0 for plan in config.plans.values() for limit in plan.limits.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_any_text_only_raises_config_error(text: str) -> None:
    _load_or_config_error(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TREES)
def test_fuzz_any_yaml_document_only_raises_config_error(tree: object) -> None:
    _load_or_config_error(yaml.safe_dump(tree))


_MUTATION_BASES = [(DATA / "valid_full.yaml").read_text()] + [path.read_text() for path in EXAMPLE_FILES]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_config_only_raises_config_error(data: st.DataObject) -> None:
    text = data.draw(st.sampled_from(_MUTATION_BASES))
    start = data.draw(st.integers(min_value=0, max_value=len(text)))
    end = data.draw(st.integers(min_value=start, max_value=min(len(text), start + 20)))
    replacement = data.draw(st.text(alphabet=" \n\t:-[]{}&*!|>'\"#%@`,0123456789abcxyz$/.", max_size=8))
    _load_or_config_error(text[:start] + replacement + text[end:])


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.sampled_from(_VOCABULARY + ["store.url", "listen.x", "a.b.c"]), st.text(max_size=10))
)
def test_fuzz_overrides_only_raise_config_error(overrides: dict[str, str]) -> None:
    try:
        load_config_text(MINIMAL, "t.yaml", overrides=overrides, env={})
    except ConfigError as error:
        assert all(_LOCATED.match(problem) for problem in error.problems), error.problems


def test_summary_says_the_connection_bounds_and_where_a_default_comes_from() -> None:
    def line(text: str) -> str:
        summary = summarize(load_config_text(text, "t.yaml")).splitlines()
        return next(found for found in summary if found.startswith("client connections per worker: "))

    assert line(MINIMAL) == ("client connections per worker: 512 per client address, what the open-file "
                             "limit leaves (logged at start) in all")
    big = MINIMAL.replace("plans:", "plans:\n  big: {limits: {slots: {concurrency: 700}}}")
    assert "1400 (twice the largest concurrency limit) per client address" in line(big)
    assert line(MINIMAL + "max_connections_per_client: 40\nmax_client_connections: 9000\n") == (
        "client connections per worker: 40 per client address, 9000 in all")


def test_the_summary_shown_in_the_configuration_reference_is_the_commands_own() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    shown = text.split("$ gateway check-config -c config/gateway.yaml\n", 1)[1].split("```", 1)[0]
    summary = summarize(load_config(EXAMPLES / "gateway.yaml", env={}))
    assert shown == summary.replace(str(EXAMPLES / "gateway.yaml"), "config/gateway.yaml") + "\n"
