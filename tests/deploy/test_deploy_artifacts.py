"""The deployment artefacts (Dockerfile, deploy/): everything that can be checked without a
container engine or a cluster.

- Alert rules: `promtool check rules`, and `promtool test rules` scenarios proving that each
  alert fires on its condition and that a healthy gateway fires none.
- Dashboard: structure, datasource variable, and every query valid PromQL (through promtool).
- Every metric name, label name and label value used in an alert or a panel appears in the
  exposition of a real gateway that was made to produce them; `promtool check metrics` lints it.
- The Docker HEALTHCHECK and the Kubernetes readiness probe commands, run against real gateways.
- Kubernetes manifests and the compose file agree with the gateway config they carry (ports,
  probes, mounts, secrets, selectors), and that config is valid.

promtool comes from the Debian package `prometheus`. Without it those tests skip, unless
GATEWAY_REQUIRE_TOOLS=1, where they fail (CI installs it). `kubectl`, when present, renders the
kustomization too.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.loader import ConfigError, load_config, load_config_text
from gateway.config.model import Config
from gateway.config.units import parse_host_port
from tests.support.processes import Proc, gateway, mock_upstream, wait_until_in_flight, write_config
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

CONFIG_PATH = "/etc/gateway/gateway.yaml"  # where every deployment mounts the config
JOB = "admission-gateway"  # the Prometheus job the alerts select
SECRETS = {"ADMIN_TOKEN": "test-admin-token", "UPSTREAM_TOKEN": "test-upstream-token"}
# Labels Prometheus attaches to a target rather than the gateway exposing them.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
REQUIRE_TOOLS = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"

# ---------------------------------------------------------------------------------- helpers


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (Debian package {package})"
        if REQUIRE_TOOLS:
            pytest.fail(f"GATEWAY_REQUIRE_TOOLS=1 but {reason}")
        pytest.skip(f"{reason}; GATEWAY_REQUIRE_TOOLS=1 makes this a failure")
    return path


@pytest.fixture
def promtool() -> str:
    return tool("promtool", "prometheus")


def run_ok(args: list[str], *, stdin: str | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(args)} failed ({result.returncode}):\n{output}"
    return output


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return list(walk(dashboard()["panels"]))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables) of every panel query."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def variable_queries() -> list[str]:
    queries = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: variables replaced by what they expand to."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(job|instance)\}?", ".*", expr)


def every_query() -> list[str]:
    return [rule["expr"] for rule in alert_rules()] + [e for _, e in dashboard_exprs()] + variable_queries()


_NAME = re.compile(r"\b(gateway_[a-z_]+)\b")
_SELECTOR = re.compile(r"\b(gateway_[a-z_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def metric_names(expr: str) -> set[str]:
    return set(_NAME.findall(expr))


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher on a gateway metric."""
    return [(name, *m) for name, body in _SELECTOR.findall(expr) for m in _MATCHER.findall(body)]


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}


def k8s(name: str) -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]
    assert len(docs) == 1, f"{name}: expected one document, found {len(docs)}"
    return dict(docs[0])


def k8s_container() -> dict[str, Any]:
    containers = k8s("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def k8s_config(env: Mapping[str, str] = SECRETS) -> Config:
    configmap = k8s("configmap.yaml")
    return load_config_text(configmap["data"]["gateway.yaml"], "deploy/k8s/configmap.yaml", env=env)


def port_of(address: str) -> int:
    return parse_host_port(address)[1]


def container_port(container: Mapping[str, Any], ref: int | str) -> int:
    """A probe's or a Service's port reference (number or name) as a container port number."""
    if isinstance(ref, int):
        assert any(p["containerPort"] == ref for p in container["ports"]), f"no container port {ref}"
        return ref
    named = [p["containerPort"] for p in container["ports"] if p.get("name") == ref]
    assert named, f"no container port named {ref!r}"
    return int(named[0])


def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def compose_mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """Bind mounts of a compose service: container path -> host path (relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = (DEPLOY / source).resolve()
    return mounts


def compose_config() -> Config:
    path = compose_mounts(compose()["services"]["gateway"])[CONFIG_PATH]
    return load_config(path, env={})


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, numbered by build stage."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    instructions, stage = [], -1
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), " ".join(args.split())))
    return instructions


def docker_args(instruction: Instruction) -> list[str]:
    """The exec-form (JSON) arguments of CMD / ENTRYPOINT / HEALTHCHECK CMD."""
    body = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        body = body[body.index("CMD ") + 4:]
    parsed = json.loads(body)
    assert isinstance(parsed, list), f"{instruction.keyword} should use the exec (JSON) form"
    return [str(item) for item in parsed]


def one(keyword: str, stage: int | None = None) -> Instruction:
    found = [i for i in dockerfile() if i.keyword == keyword and (stage is None or i.stage == stage)]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def final_stage() -> int:
    return max(i.stage for i in dockerfile())


def docker_arg_defaults() -> dict[str, str]:
    defaults = {}
    for i in dockerfile():
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            defaults[name] = value
    return defaults


def resolve_docker_vars(text: str) -> str:
    defaults = docker_arg_defaults()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def dockerignored(path: str) -> bool:
    """Whether `path` is left out of the build context (last matching pattern wins)."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignored = False
    for pattern in patterns:
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            ignored = not negate
    return ignored


# ------------------------------------------------------------------------------ alert rules


def test_alert_rules_pass_promtool(promtool: str) -> None:
    output = run_ok([promtool, "check", "rules", str(ALERTS)])
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_every_alert_has_for_severity_and_annotations() -> None:
    rules = alert_rules()
    assert rules and all("alert" in rule for rule in rules), "alerts.yml holds alerting rules only"
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for:` duration"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"


def test_alerts_cover_the_operational_signals() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in rules_by_name().values()}
    joined = "\n".join(exprs.values())
    for needle in [
        "gateway_store_errors_total",
        "gateway_store_fallback_decisions_total",
        "rate(gateway_bans_total",
        'gateway_upstream_responses_total{code=~"5xx',
        'gateway_upstream_responses_total{code="timeout"}',
        'gateway_requests_total{outcome="concurrency_limited"}',
        "gateway_in_flight_requests",
        'gateway_connections_refused_total{port="public", limit="total"}',
        'gateway_config_reloads_total{result="error"}',
        f'up{{job="{JOB}"}} == 0',
    ]:
        assert needle in joined, f"no alert expression uses {needle}"


def rules_by_name() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in alert_rules()}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": JOB, **labels}
    body = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


INSTANCE = "10.0.0.7:9464"
ROUTE = "/v1/**"
# One scenario per alert: input series and the exact labels of the alert that must fire.
FIRING: dict[str, tuple[list[dict[str, str]], str, dict[str, str]]] = {
    "GatewayDown": (
        [series("up", "1 1 0x10", instance=INSTANCE)],
        "6m", {"severity": "critical", "job": JOB, "instance": INSTANCE},
    ),
    "GatewayTargetsMissing": (
        [series("up", "1x20", job="something-else", instance=INSTANCE)],
        "10m", {"severity": "critical", "job": JOB},
    ),
    "GatewayConfigReloadFailed": (  # the first failure: the series is born at 1
        [series("gateway_config_reloads_total", "_x20 1x40", instance=INSTANCE, result="error"),
         series("gateway_config_reloads_total", "1x60", instance=INSTANCE, result="success")],
        "30m", {"severity": "warning", "job": JOB, "instance": INSTANCE},
    ),
    "GatewayStoreErrors": (
        [series("gateway_store_errors_total", "0+60x20", instance=INSTANCE, operation="admit")],
        "15m", {"severity": "warning", "job": JOB, "instance": INSTANCE, "operation": "admit"},
    ),
    "GatewayDegradedMode": (
        [series("gateway_store_fallback_decisions_total", "0+30x20", instance=INSTANCE, mode="local")],
        "10m", {"severity": "warning", "job": JOB, "instance": INSTANCE, "mode": "local"},
    ),
    "GatewayStoreDenying": (
        [series("gateway_store_fallback_decisions_total", "0+30x20", instance=INSTANCE, mode="deny")],
        "10m", {"severity": "critical", "job": JOB, "instance": INSTANCE},
    ),
    "GatewayAdmissionSlow": (
        [series("gateway_admission_duration_seconds_bucket", "0x30", instance=INSTANCE, le="0.01"),
         series("gateway_admission_duration_seconds_bucket", "0+100x30", instance=INSTANCE, le="0.1"),
         series("gateway_admission_duration_seconds_bucket", "0+100x30", instance=INSTANCE, le="+Inf")],
        "20m", {"severity": "warning", "job": JOB, "instance": INSTANCE},
    ),
    "GatewayBanStorm": (
        [series("gateway_bans_total", "0+10x20", instance=INSTANCE)],
        "15m", {"severity": "warning", "job": JOB},
    ),
    "GatewayUpstreamErrorRatio": (
        [series("gateway_upstream_responses_total", "0+600x30", instance=INSTANCE, route=ROUTE, code="2xx"),
         series("gateway_upstream_responses_total", "0+60x30", instance=INSTANCE, route=ROUTE, code="5xx")],
        "20m", {"severity": "warning", "job": JOB, "route": ROUTE},
    ),
    "GatewayUpstreamTimeouts": (
        [series("gateway_upstream_responses_total", "0+600x30", instance=INSTANCE, route=ROUTE, code="2xx"),
         series("gateway_upstream_responses_total", "0+60x30", instance=INSTANCE, route=ROUTE,
                code="timeout")],
        "20m", {"severity": "warning", "job": JOB, "route": ROUTE},
    ),
    "GatewayConcurrencySaturation": (
        [series("gateway_requests_total", "0+600x30", instance=INSTANCE, plan="free", route="/v1/**",
                outcome="admitted"),
         series("gateway_requests_total", "0+300x30", instance=INSTANCE, plan="free", route="/v1/**",
                outcome="concurrency_limited")],
        "25m", {"severity": "warning", "job": JOB, "plan": "free"},
    ),
    "GatewayInFlightHigh": (
        [series("gateway_in_flight_requests", "450x20", instance=INSTANCE, plan="pro"),
         series("gateway_in_flight_requests", "10x20", instance=INSTANCE, plan="free")],
        "10m", {"severity": "warning", "job": JOB, "instance": INSTANCE},
    ),
    "GatewayConnectionLimit": (
        [series("gateway_connections_refused_total", "0+30x20", instance=INSTANCE, port="public", limit="total")],
        "15m", {"severity": "warning", "job": JOB, "instance": INSTANCE},
    ),
}

# A busy, healthy gateway: traffic, some 429s and 5xx, fast admission, one successful reload.
HEALTHY = [
    series("up", "1x40", instance=INSTANCE),
    series("gateway_requests_total", "0+600x40", instance=INSTANCE, plan="pro", route=ROUTE,
           outcome="admitted"),
    series("gateway_requests_total", "0+30x40", instance=INSTANCE, plan="pro", route=ROUTE,
           outcome="concurrency_limited"),
    series("gateway_requests_total", "0+60x40", instance=INSTANCE, plan="pro", route=ROUTE,
           outcome="rate_limited"),
    series("gateway_upstream_responses_total", "0+600x40", instance=INSTANCE, route=ROUTE, code="2xx"),
    series("gateway_upstream_responses_total", "0+6x40", instance=INSTANCE, route=ROUTE, code="5xx"),
    series("gateway_upstream_responses_total", "0+3x40", instance=INSTANCE, route=ROUTE, code="timeout"),
    series("gateway_in_flight_requests", "40x40", instance=INSTANCE, plan="pro"),
    series("gateway_store_errors_total", "0x10 1x30", instance=INSTANCE, operation="admit"),
    series("gateway_bans_total", "0x10 1x30", instance=INSTANCE),
    series("gateway_admission_duration_seconds_bucket", "0+590x40", instance=INSTANCE, le="0.001"),
    series("gateway_admission_duration_seconds_bucket", "0+600x40", instance=INSTANCE, le="0.01"),
    series("gateway_admission_duration_seconds_bucket", "0+600x40", instance=INSTANCE, le="+Inf"),
    series("gateway_config_reloads_total", "0x10 1x30", instance=INSTANCE, result="success"),
    series("gateway_config_reloads_total", "0x40", instance=INSTANCE, result="error"),
    # a client over its own connection bound now and then, the admin port's bound once
    series("gateway_connections_refused_total", "0x10 0+2x30", instance=INSTANCE, port="public", limit="per_client"),
    series("gateway_connections_refused_total", "0x40", instance=INSTANCE, port="public", limit="total"),
    series("gateway_connections_refused_total", "0x10 1x30", instance=INSTANCE, port="admin", limit="total"),
]


def promtool_tests() -> list[dict[str, Any]]:
    names = list(rules_by_name())
    tests = []
    for name, (inputs, at, labels) in FIRING.items():
        # Only the alert under test fires, at that moment (the target is up unless said otherwise).
        if not any(s["series"].startswith("up{") for s in inputs):
            inputs = [*inputs, series("up", "1x60", instance=INSTANCE)]
        tests.append({
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [
                {"eval_time": at, "alertname": other,
                 "exp_alerts": [{"exp_labels": labels}] if other == name else []}
                for other in names
            ],
        })
    tests.append({  # a healthy gateway fires nothing, early or late
        "interval": "1m",
        "input_series": HEALTHY,
        "alert_rule_test": [
            {"eval_time": at, "alertname": name, "exp_alerts": []}
            for at in ("5m", "20m", "39m")
            for name in names
        ],
    })
    tests.append({  # a reload failure stops alerting once it is 15 minutes old
        "interval": "1m",
        "input_series": FIRING["GatewayConfigReloadFailed"][0] + [series("up", "1x60", instance=INSTANCE)],
        "alert_rule_test": [{"eval_time": "50m", "alertname": "GatewayConfigReloadFailed", "exp_alerts": []}],
    })
    tests.append({  # little traffic: one 5xx among a handful of requests is not an error ratio
        "interval": "1m",
        "input_series": [
            series("gateway_upstream_responses_total", "0+1x30", instance=INSTANCE, route=ROUTE, code="2xx"),
            series("gateway_upstream_responses_total", "0+1x30", instance=INSTANCE, route=ROUTE, code="5xx"),
        ],
        "alert_rule_test": [{"eval_time": "25m", "alertname": "GatewayUpstreamErrorRatio", "exp_alerts": []}],
    })
    return tests


def test_every_alert_has_a_firing_scenario() -> None:
    assert set(FIRING) == set(rules_by_name())


def test_alerts_fire_on_their_condition_and_not_when_healthy(promtool: str, tmp_path: Path) -> None:
    # promtool compares annotations too; their templates are checked by `check rules`, so the
    # scenarios run on a copy without them and compare labels only.
    groups = load_yaml(ALERTS)["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": promtool_tests()}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run_ok([promtool, "test", "rules", "tests.yml"], cwd=tmp_path)


def test_prometheus_rule_wraps_the_same_groups() -> None:
    rule = k8s("prometheus-rules.yaml")
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(ALERTS)["groups"]


# -------------------------------------------------------------------------------- dashboard


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] == "${datasource}", f"{panel['title']}: fixed datasource"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}"


def test_dashboard_shows_the_required_views() -> None:
    exprs = [" ".join(expr.split()) for _, expr in dashboard_exprs()]

    def has(*needles: str) -> bool:
        return any(all(needle in expr for needle in needles) for expr in exprs)

    assert has("by (outcome)", "rate(gateway_requests_total")
    assert has("by (plan)", "rate(gateway_requests_total")
    for quantile in ("0.5", "0.99"):
        assert has(f"histogram_quantile({quantile},", "gateway_admission_duration_seconds_bucket", "le")
    assert has("histogram_quantile(0.99,", "gateway_request_duration_seconds_bucket", "route")
    assert has("by (code)", "gateway_upstream_responses_total")
    assert has("by (plan)", "gateway_in_flight_requests")
    assert has("gateway_store_errors_total") and has("gateway_store_fallback_decisions_total")
    assert has("gateway_bans_total") and has("gateway_banned_ips")
    assert has("gateway_slots_reclaimed_total")
    assert has("gateway_config_reloads_total", "result")


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    exprs = [expr for _, expr in dashboard_exprs()]
    rules = [{"record": f"dashboard:query_{n}", "expr": as_promql(expr)} for n, expr in enumerate(exprs)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_ok([promtool, "check", "rules", str(path)])


# ----------------------------------------------- against real gateways (exposition, probes)


ADMIN_TOKEN = "e2e-admin-token"
BUSY_KEY, TIGHT_KEY = "busy-key-0123456789", "tight-key-0123456789"


@dataclass
class Running:
    gateway: Proc  # memory store, admin token set
    degraded: Proc  # Redis store that is not there, on_error: deny
    expositions: list[str]


def gateway_config(upstream: str, **extra: Any) -> dict[str, Any]:
    return {
        "admin_token": ADMIN_TOKEN,
        "upstream": {"url": upstream, "timeout": "1s"},
        "keys": [
            {"id": "busy", "key": BUSY_KEY, "plan": "big"},
            {"id": "tight", "key": TIGHT_KEY, "plan": "small"},
        ],
        "plans": {
            "big": {"limits": {"rpm": {"rate": "1000/1m"}, "requests": {"concurrency": 1}}},
            "small": {"limits": {"rpm": {"rate": "1/1m"}}},
        },
        "routes": [{"path": "/**", "methods": ["GET"], "limits": ["rpm", "requests"]}],
        **extra,
    }


def scrape(proc: Proc) -> str:
    response = httpx.get(proc.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200
    return str(response.text)


def wait_for_metric(proc: Proc, needle: str) -> None:
    deadline = time.monotonic() + 10
    while needle not in scrape(proc):
        assert time.monotonic() < deadline, f"{needle} never appeared:\n{proc.log()}"
        time.sleep(0.05)


def make_every_outcome(proc: Proc, upstream: str, config_path: Path) -> None:
    """Drive the gateway through every series the alerts and panels look at."""
    busy = {"X-API-Key": BUSY_KEY}
    with httpx.Client(timeout=10) as client:
        assert client.get(proc.url + "/", headers=busy).status_code == 200
        assert client.get(proc.url + "/status/503", headers=busy).status_code == 503
        assert client.get(proc.url + "/close_immediately", headers=busy).status_code == 502
        assert client.get(proc.url + "/delay_headers?ms=2500", headers=busy).status_code == 504
        assert client.post(proc.url + "/", headers=busy).status_code == 404  # no_route
        assert client.get(proc.url + "/").status_code == 401
        assert client.get(proc.url + "/", headers={"X-API-Key": TIGHT_KEY}).status_code == 200
        assert client.get(proc.url + "/", headers={"X-API-Key": TIGHT_KEY}).status_code == 429
        holder = threading.Thread(
            target=lambda: httpx.get(proc.url + "/hold?ms=5000", headers=busy, timeout=10)
        )
        holder.start()
        try:
            wait_until_in_flight(upstream, "busy", 1)  # the holder has the only slot
            response = client.get(proc.url + "/", headers=busy)
            assert response.status_code == 429 and response.json()["error"] == "concurrency_limited"
        finally:
            httpx.post(upstream + "/_release")
            holder.join(10)
    proc.send_signal(signal.SIGHUP)
    wait_for_metric(proc, 'gateway_config_reloads_total{result="success"}')
    config_path.write_text("listen: [\n")
    proc.send_signal(signal.SIGHUP)
    wait_for_metric(proc, 'gateway_config_reloads_total{result="error"}')


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("deploy")
    with mock_upstream() as upstream:
        main_path = write_config(tmp / "gateway.yaml", gateway_config(upstream))
        dead_store = {"url": f"redis://127.0.0.1:{free_port()}/0", "on_error": "deny"}
        degraded_path = write_config(tmp / "degraded.yaml", gateway_config(upstream, store=dead_store))
        with gateway(main_path) as main, gateway(degraded_path) as degraded:
            make_every_outcome(main, upstream, main_path)
            answer = httpx.get(degraded.url + "/", headers={"X-API-Key": BUSY_KEY})
            assert answer.status_code == 503 and answer.json()["error"] == "store_unavailable"
            yield Running(main, degraded, [scrape(main), scrape(degraded)])


def exposed(expositions: list[str]) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> values seen, over several expositions."""
    found: dict[str, dict[str, set[str]]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = found.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    labels.setdefault(label, set()).add(value)
    return found


@pytest.mark.e2e
def test_every_metric_in_alerts_and_dashboard_is_exposed(running: Running) -> None:
    samples = exposed(running.expositions)
    used = {name for expr in every_query() for name in metric_names(expr)}
    assert used, "no gateway metric found in the queries"
    missing = sorted(used - set(samples))
    assert not missing, f"used in deploy/ but not exposed by the gateway: {missing}"


@pytest.mark.e2e
def test_every_label_and_value_in_queries_is_exposed(running: Running) -> None:
    samples = exposed(running.expositions)
    for expr in every_query():
        for name, label, operator, value in matchers(expr):
            if label in TARGET_LABELS:
                continue
            assert label in samples[name], f"{name} has no label {label!r} (in {expr!r})"
            if operator == "=" or (operator == "=~" and re.fullmatch(r"[\w|]+", value)):
                for wanted in value.split("|"):
                    assert wanted in samples[name][label], f'{name}{{{label}="{wanted}"}} never exposed'
        names = metric_names(expr)
        labels_here = set().union(*(samples[name].keys() for name in names)) if names else set()
        for label in grouping_labels(expr) - TARGET_LABELS - {"le"}:
            assert label in labels_here, f"grouping by {label!r}, which none of {names} has: {expr!r}"


@pytest.mark.e2e
def test_exposition_passes_promtool_check_metrics(running: Running, promtool: str) -> None:
    run_ok([promtool, "check", "metrics"], stdin=running.expositions[0])


@pytest.mark.e2e
def test_docker_healthcheck_command_reports_health(running: Running) -> None:
    command = docker_args(one("HEALTHCHECK", final_stage()))
    assert command[0] == "python"
    script = command[-1]
    address = f"127.0.0.1:{port_of(compose_config().admin_listen)}"
    assert address in script
    up = [sys.executable, *command[1:-1], script.replace(address, f"127.0.0.1:{running.gateway.admin_port}")]
    assert subprocess.run(up, capture_output=True, timeout=10).returncode == 0
    down = [sys.executable, *command[1:-1], script.replace(address, f"127.0.0.1:{free_port()}")]
    assert subprocess.run(down, capture_output=True, timeout=10).returncode != 0


@pytest.mark.e2e
def test_k8s_readiness_probe_command_follows_readyz(running: Running) -> None:
    command = k8s_container()["readinessProbe"]["exec"]["command"]
    assert command[0] == "python"
    address = f"127.0.0.1:{port_of(k8s_config().admin_listen)}"
    script = command[-1]
    assert address in script

    def probe(proc: Proc, token: str) -> int:
        args = [sys.executable, *command[1:-1], script.replace(address, f"127.0.0.1:{proc.admin_port}")]
        env = {**os.environ, "ADMIN_TOKEN": token}
        return subprocess.run(args, capture_output=True, timeout=10, env=env).returncode

    assert probe(running.gateway, ADMIN_TOKEN) == 0
    assert probe(running.gateway, "wrong-token") != 0
    assert probe(running.degraded, ADMIN_TOKEN) != 0  # the store does not answer: not ready


# ------------------------------------------------------------------------------- Kubernetes

EXPECTED_KINDS = {
    "configmap.yaml": ("v1", "ConfigMap"),
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
    "servicemonitor.yaml": ("monitoring.coreos.com/v1", "ServiceMonitor"),
    "prometheus-rules.yaml": ("monitoring.coreos.com/v1", "PrometheusRule"),
    "kustomization.yaml": ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}


def test_manifests_parse_with_expected_kinds() -> None:
    assert {p.name for p in K8S.glob("*.y*ml")} == set(EXPECTED_KINDS)
    for name, (api_version, kind) in EXPECTED_KINDS.items():
        doc = k8s(name)
        assert (doc["apiVersion"], doc["kind"]) == (api_version, kind), name


def test_kustomization_lists_every_manifest() -> None:
    resources = k8s("kustomization.yaml")["resources"]
    assert sorted(resources) == sorted(set(EXPECTED_KINDS) - {"kustomization.yaml"})


def test_kustomize_renders_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    rendered = [doc for doc in yaml.safe_load_all(run_ok([kubectl, "kustomize", str(K8S)])) if doc]
    assert sorted(doc["kind"] for doc in rendered) == sorted(
        kind for name, (_, kind) in EXPECTED_KINDS.items() if name != "kustomization.yaml"
    )


def test_configmap_holds_a_valid_config_on_redis() -> None:
    config = k8s_config()
    assert config.store.url.startswith(("redis://", "rediss://", "redis+sentinel://", "redis+cluster://"))
    assert config.admin_token == SECRETS["ADMIN_TOKEN"]
    assert ("X-Upstream-Token", SECRETS["UPSTREAM_TOKEN"]) in config.upstream.set_headers
    for address in (config.listen, config.admin_listen):  # reachable from kubelet and Prometheus
        assert parse_host_port(address)[0] in ("0.0.0.0", "::"), address


def test_configmap_secrets_come_from_the_secret_through_env() -> None:
    with pytest.raises(ConfigError, match="ADMIN_TOKEN"):
        k8s_config(env={"UPSTREAM_TOKEN": "x"})  # the token is required, not silently empty
    text = k8s("configmap.yaml")["data"]["gateway.yaml"]
    referenced = set(re.findall(r"\$\{(\w+)", text))
    env = {item["name"]: item for item in k8s_container()["env"]}
    assert referenced <= set(env), f"the config uses variables the pod does not set: {referenced - set(env)}"
    for name in SECRETS:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "gateway-secrets" and not ref.get("optional", False), name
    # Prometheus reads the same token from the same Secret key
    credentials = k8s("servicemonitor.yaml")["spec"]["endpoints"][0]["authorization"]["credentials"]
    token_key = env["ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"]
    assert credentials == {"name": "gateway-secrets", "key": token_key}


def test_container_ports_match_the_config() -> None:
    config, container = k8s_config(), k8s_container()
    assert container_port(container, "http") == port_of(config.listen)
    assert container_port(container, "metrics") == port_of(config.admin_listen)


def test_probes_use_the_admin_port() -> None:
    config, container = k8s_config(), k8s_container()
    admin = port_of(config.admin_listen)
    liveness = container["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz" and container_port(container, liveness["port"]) == admin
    readiness = container["readinessProbe"]
    if "httpGet" in readiness:
        assert readiness["httpGet"]["path"] == "/readyz"
        assert container_port(container, readiness["httpGet"]["port"]) == admin
    else:  # exec: /readyz wants the admin token, which an HTTP probe cannot read from a Secret
        script = " ".join(readiness["exec"]["command"])
        assert f"127.0.0.1:{admin}/readyz" in script and "ADMIN_TOKEN" in script


def test_shutdown_outlasts_prestop_and_grace() -> None:
    config = k8s_config()
    pod = k8s("deployment.yaml")["spec"]["template"]["spec"]
    pre_stop = k8s_container()["lifecycle"]["preStop"]
    sleep = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    assert 2 <= sleep <= 15
    assert pod["terminationGracePeriodSeconds"] > sleep + config.shutdown_grace


def test_pod_runs_locked_down() -> None:
    pod = k8s("deployment.yaml")["spec"]["template"]["spec"]
    container = k8s_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == docker_uid() != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    # the read-only root leaves /tmp (multi-worker metric files) to a writable emptyDir
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


def test_config_is_mounted_from_the_configmap() -> None:
    pod = k8s("deployment.yaml")["spec"]["template"]["spec"]
    container = k8s_container()
    configmap = k8s("configmap.yaml")
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    items = {item["path"]: item["key"] for item in volume["configMap"]["items"]}
    mounted = {f"{mount['mountPath'].rstrip('/')}/{path}": key for path, key in items.items()}
    assert mounted[CONFIG_PATH] in configmap["data"]
    args = container.get("args") or docker_args(one("CMD", final_stage()))
    assert args[args.index("-c") + 1] == CONFIG_PATH


def test_service_targets_the_container_ports() -> None:
    service, container = k8s("service.yaml"), k8s_container()
    config = k8s_config()
    pod_labels = k8s("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = service["spec"]["ports"]
    targets = {port["name"]: container_port(container, port["targetPort"]) for port in ports}
    assert targets["metrics"] == port_of(config.admin_listen)
    assert port_of(config.listen) in targets.values()
    assert service["metadata"]["name"] == JOB, "the ServiceMonitor's job label is the Service name"


def test_servicemonitor_selects_the_service_metrics_port() -> None:
    monitor, service = k8s("servicemonitor.yaml"), k8s("service.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics" in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint.get("path", "/metrics") == "/metrics"


def test_hpa_and_pdb_cover_the_deployment() -> None:
    deployment, hpa, pdb = k8s("deployment.yaml"), k8s("hpa.yaml"), k8s("pdb.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# ---------------------------------------------------------------------------------- compose


def test_compose_has_every_service() -> None:
    services = compose()["services"]
    assert {"gateway", "redis", "prometheus", "grafana", "upstream"} <= set(services)
    for service in services.values():
        for source in compose_mounts(service).values():
            assert source.exists(), f"compose mounts {source}, which does not exist"


def test_compose_gateway_config_is_valid_and_wired() -> None:
    services = compose()["services"]
    gw = services["gateway"]
    config = compose_config()
    workers = gw["command"][gw["command"].index("--workers") + 1] if "--workers" in gw["command"] else "1"
    assert int(workers) >= 2 or gw.get("deploy", {}).get("replicas", 1) >= 2
    assert config.store.url == "redis://redis:6379/0"
    mounted = compose_mounts(gw)[CONFIG_PATH].read_text()
    variables = set(re.findall(r"\$\{(\w+)", mounted))
    assert variables <= set(gw.get("environment", {})), f"compose never sets {variables}"
    assert parse_host_port(config.admin_listen) == ("0.0.0.0", 9464)
    published = {str(p).rsplit(":", 1)[-1] for p in gw["ports"]}
    assert {str(port_of(config.listen)), str(port_of(config.admin_listen))} <= published
    # the upstream service is the example upstream, on the port the config points at
    upstream = services["upstream"]
    assert upstream["command"][0] == "example-upstream"
    listen = upstream["command"][upstream["command"].index("--listen") + 1]
    assert config.upstream.url == f"http://upstream:{port_of(listen)}"
    assert upstream["image"] == gw["image"], "the example upstream runs from the gateway's image"
    assert (DEPLOY / gw["build"]["context"]).resolve() == ROOT
    assert (ROOT / gw["build"]["dockerfile"]).resolve() == DOCKERFILE
    # a stop waits for the drain; a read-only container keeps /tmp writable for --workers
    grace = re.fullmatch(r"(\d+)s", gw["stop_grace_period"])
    assert grace and int(grace.group(1)) > config.shutdown_grace
    assert gw["read_only"] is True and "/tmp" in gw["tmpfs"]


def test_compose_redis_never_evicts_and_keeps_nothing() -> None:
    command = compose()["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--save"] == "" and options["--appendonly"] == "no"


def test_compose_prometheus_scrapes_the_gateway_and_loads_the_alerts(promtool: str, tmp_path: Path) -> None:
    mounts = compose_mounts(compose()["services"]["prometheus"])
    prometheus_yml = mounts["/etc/prometheus/prometheus.yml"]
    settings = load_yaml(prometheus_yml)
    job = next(j for j in settings["scrape_configs"] if j["job_name"] == JOB)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"gateway:{port_of(compose_config().admin_listen)}"]
    rules = [target for target, source in mounts.items() if source == ALERTS.resolve()]
    assert len(rules) == 1
    relative = Path(rules[0]).relative_to("/etc/prometheus")
    assert any(fnmatch.fnmatch(str(relative), pattern) for pattern in settings["rule_files"])
    # the same layout as in the container, checked by promtool (config and rule files)
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ALERTS, tmp_path / relative)
    shutil.copy(prometheus_yml, tmp_path / "prometheus.yml")
    output = run_ok([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_compose_grafana_is_provisioned_with_the_dashboard() -> None:
    mounts = compose_mounts(compose()["services"]["grafana"])
    provisioning = Path("/etc/grafana/provisioning")
    datasources = load_yaml(mounts[str(provisioning / "datasources")] / "prometheus.yaml")["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]
    providers = load_yaml(mounts[str(provisioning / "dashboards")] / "gateway.yaml")["providers"]
    folder = providers[0]["options"]["path"]
    dashboards = [target for target, source in mounts.items() if source == DASHBOARD.resolve()]
    assert len(dashboards) == 1 and Path(dashboards[0]).parent == Path(folder)


# ------------------------------------------------------------------------------- Dockerfile


def docker_uid() -> int:
    user = [i for i in dockerfile() if i.keyword == "USER" and i.stage == final_stage()][-1].args
    return int(user.split(":")[0])


def test_dockerfile_installs_the_project_like_the_readme() -> None:
    # the scripts the README points to install the project directory with pip ...
    quickstart = (ROOT / "scripts" / "quickstart").read_text()
    assert re.search(r"pip install .*(^|\s)(-e\s+)?\.\s*$", quickstart, re.M)
    # ... and so does the image's builder stage, in the directory it copied the project into
    instructions = dockerfile()
    builder = [i for i in instructions if i.stage == 0]
    assert re.search(r"\bAS\s+builder$", builder[0].args, re.I)
    pip_install_here = re.compile(r"\bpip install(\s+-\S+)*\s+\.$")
    installs = [i for i in builder if i.keyword == "RUN" and pip_install_here.search(i.args)]
    assert len(installs) == 1
    copies = [i.args.split() for i in builder if i.keyword == "COPY"]
    copied = {source for args in copies for source in args[:-1]}
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert {"pyproject.toml", "gateway"} <= copied
    if re.search(r'^readme\s*=\s*"README.md"', pyproject, re.M):
        assert "README.md" in copied, "setuptools reads the readme while building"
    for source in copied:
        assert (ROOT / source).exists() and not dockerignored(source), f"{source} is not in the build context"
    for left_out in (".venv", ".git", "tests"):
        assert dockerignored(left_out), left_out


def test_dockerfile_final_stage_is_slim_non_root_and_from_the_venv() -> None:
    final = final_stage()
    assert final >= 1, "multi-stage: a builder, then the image"
    base = resolve_docker_vars(one("FROM", final).args)
    assert base == "python:3.11-slim"
    builder_base = resolve_docker_vars(one("FROM", 0).args.split()[0])
    assert builder_base == base, "the venv's interpreter path must exist in the final image"
    copy = [i.args for i in dockerfile() if i.keyword == "COPY" and i.stage == final]
    assert len(copy) == 1 and copy[0].startswith("--from=builder ")
    venv = copy[0].split()[-1]
    env = " ".join(i.args for i in dockerfile() if i.keyword == "ENV" and i.stage == final)
    assert f"PATH={venv}/bin:" in env
    assert docker_uid() != 0
    assert docker_args(one("ENTRYPOINT", final)) == ["gateway"]
    assert docker_args(one("CMD", final)) == ["serve", "-c", CONFIG_PATH]


def test_dockerfile_ports_and_healthcheck_match_the_mounted_configs() -> None:
    final = final_stage()
    for config in (compose_config(), k8s_config()):
        exposed_ports = {int(port) for port in one("EXPOSE", final).args.split()}
        assert {port_of(config.listen), port_of(config.admin_listen)} <= exposed_ports
        script = docker_args(one("HEALTHCHECK", final))[-1]
        assert f"http://127.0.0.1:{port_of(config.admin_listen)}/healthz" in script
    assert CONFIG_PATH in compose_mounts(compose()["services"]["gateway"])
