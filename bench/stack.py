"""The processes a benchmark run measures, and how each scenario is set up and checked.

Topology on a 2-core machine (PERFORMANCE.md §5): the load generator, the upstream nginx and
the private redis-server share CPU 0; a one-worker system under test is pinned to CPU 1;
two-worker systems run unpinned on both CPUs (with everything else).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from procs import Proc, free_port, http_get, pinned, wait_port

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
PROJECT_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
GATEWAY = os.path.join(ROOT, ".venv", "bin", "gateway")

# BENCH_PIN=0 runs everything on every CPU (the "unpinned variant" of PERFORMANCE.md §5).
PIN = os.environ.get("BENCH_PIN", "1") != "0"
LOAD_CPUS: str | None = "0" if PIN else None  # load generator, upstream, Redis
SUT_CPUS: str | None = "1" if PIN else None  # one-worker system under test
PATH = "/v1/bench"
KEY = "bench-key-000000"
OVER_KEY = "over-limit-key"
BAD_KEY = "not-a-key"
BODY = '{"data":"' + "x" * 1010 + '"}'  # 1,021 bytes


@dataclass
class Scenario:
    id: str
    label: str
    kind: str  # direct | nginx | bare | gateway | refusal-key | refusal-ban
    workers: int
    client: str | None
    store: str | None  # memory | redis | None
    port: int
    proc: Proc | None  # the system under test (None: the upstream itself)
    headers: dict[str, str] = field(default_factory=dict)
    expect: int = 200
    uses_redis: bool = False
    available: bool = True
    note: str = ""
    admin_port: int | None = None  # the gateway's /metrics


def _render(template: str, **values: object) -> str:
    with open(os.path.join(BENCH_DIR, "nginx", template)) as file:
        text = file.read()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    return text


class Stack:
    """Starts everything once; scenarios are interleaved over the running processes."""

    def __init__(self, run_dir: str, quick: bool) -> None:
        self.run_dir = run_dir
        self.quick = quick
        self.procs: list[Proc] = []
        self.scenarios: list[Scenario] = []
        os.makedirs(os.path.join(run_dir, "tmp"), exist_ok=True)
        self.redis_port = free_port()
        self.upstream_port = free_port()
        self.redis: Proc | None = None
        self.upstream: Proc | None = None

    # -- infrastructure -----------------------------------------------------------------------

    def _proc(self, name: str, argv: list[str], cpus: str | None, stdout: bool = False) -> Proc:
        proc = Proc(name, pinned(cpus, argv), os.path.join(self.run_dir, f"{name}.log"),
                    stdout_path=os.path.join(self.run_dir, f"{name}.out") if stdout else None)
        self.procs.append(proc.start())
        return proc

    def start_base(self) -> None:
        self.redis = self._proc("redis", [
            "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.run_dir, "--protected-mode", "no", "--loglevel", "warning",
        ], LOAD_CPUS)
        conf = os.path.join(self.run_dir, "upstream.conf")
        with open(conf, "w") as file:
            file.write(_render("upstream.conf.in", RUN=self.run_dir, NAME="upstream", PORT=self.upstream_port, BODY=BODY))
        self.upstream = self._proc("upstream", ["nginx", "-c", conf, "-e", os.path.join(self.run_dir, "upstream.err")], LOAD_CPUS)
        wait_port(self.redis_port, self.redis)
        wait_port(self.upstream_port, self.upstream)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # -- systems under test -------------------------------------------------------------------

    def add_direct(self) -> None:
        self.scenarios.append(Scenario("direct", "upstream directly (nginx return 200)", "direct", 1, None, None,
                                       self.upstream_port, None, {"X-API-Key": KEY}))

    def add_nginx(self, workers: int) -> None:
        name = f"nginx-w{workers}"
        port = free_port()
        conf = os.path.join(self.run_dir, f"{name}.conf")
        with open(conf, "w") as file:
            file.write(_render("proxy-limit.conf.in", RUN=self.run_dir, NAME=name, PORT=port, WORKERS=workers,
                               UPSTREAM_PORT=self.upstream_port))
        proc = self._proc(name, ["nginx", "-c", conf, "-e", os.path.join(self.run_dir, f"{name}.err")],
                          SUT_CPUS if workers == 1 else None)
        self.scenarios.append(Scenario(name, f"nginx proxy_pass + limit_req + limit_conn, {workers} worker(s)", "nginx",
                                       workers, None, None, port, proc, {"X-API-Key": KEY}))

    def add_bare(self, client: str, workers: int) -> None:
        name = f"bare-{client}-w{workers}"
        port = free_port()
        proc = self._proc(name, [PROJECT_PYTHON, os.path.join(BENCH_DIR, "bare_proxy.py"), "--listen", f"127.0.0.1:{port}",
                                 "--upstream", f"http://127.0.0.1:{self.upstream_port}", "--client", client,
                                 "--workers", str(workers)], SUT_CPUS if workers == 1 else None)
        self.scenarios.append(Scenario(name, f"bare Python proxy ({client}), {workers} worker(s)", "bare", workers, client,
                                       None, port, proc, {"X-API-Key": KEY}))

    def gateway_config(self, name: str, port: int, admin_port: int, client: str, store: str, bans: bool,
                       store_timeout: str | None = None) -> str:
        store_url = "memory://" if store == "memory" else self.redis_url
        text = f"""# generated by bench/run for scenario {name}
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
shutdown_grace: 1s
upstream:
  url: http://127.0.0.1:{self.upstream_port}
  client: {client}
  max_connections: 512
store:
  url: {store_url}
  prefix: {name}
{f"  timeout: {store_timeout}{chr(10)}" if store_timeout else ""}keys:
  - {{id: bench, key: {KEY}, plan: bench}}
  - {{id: over, key: {OVER_KEY}, plan: tiny}}
plans:
  bench:            # never hit: this measures the cost of admission, not refusals
    limits:
      rate: {{rate: 1000000/10s}}
      inflight: {{concurrency: 100000}}
  tiny:             # one request per hour: every later request is refused
    limits:
      rate: {{rate: 1/1h}}
routes:
  - path: /v1/**
    limits: [rate, inflight]
"""
        if bans:
            text += "bans: {strikes: 5, within: 1m, duration: 1h, allow: []}\n"
        path = os.path.join(self.run_dir, f"{name}.yaml")
        with open(path, "w") as file:
            file.write(text)
        return path

    def _gateway_proc(self, name: str, client: str, store: str, workers: int, bans: bool) -> tuple[Proc, int, int]:
        port, admin_port = free_port(), free_port()
        config = self.gateway_config(name, port, admin_port, client, store, bans)
        # stdout is the access log (one JSON line per request): discarded, as a pipe to a
        # collector would cost about the same write().
        proc = self._proc(name, [GATEWAY, "serve", "-c", config, "--workers", str(workers)],
                          SUT_CPUS if workers == 1 else None)
        return proc, port, admin_port

    def add_gateway(self, client: str, store: str, workers: int) -> Scenario:
        name = f"gw-{store}-{client}-w{workers}"
        proc, port, admin_port = self._gateway_proc(name, client, store, workers, bans=False)
        scenario = Scenario(name, f"gateway, {'memory' if store == 'memory' else 'Redis'} store ({client}), {workers} worker(s)",
                            "gateway", workers, client, store, port, proc, {"X-API-Key": KEY}, uses_redis=store == "redis",
                            admin_port=admin_port)
        self.scenarios.append(scenario)
        return scenario

    def add_refusal_key(self, base: Scenario) -> None:
        """The same gateway process, with a key that is over its limit (429, nothing upstream)."""
        store = base.store or "memory"
        self.scenarios.append(Scenario(
            f"refuse-key-{store}-w{base.workers}", f"refusal: key over its limit, {store} store, {base.workers} worker(s)",
            "refusal-key", base.workers, base.client, store, base.port, base.proc, {"X-API-Key": OVER_KEY}, expect=429,
            uses_redis=store == "redis", admin_port=base.admin_port))

    def add_refusal_ban(self, store: str, workers: int) -> None:
        name = f"refuse-ban-{store}-w{workers}"
        proc, port, admin_port = self._gateway_proc(name, "aiohttp", store, workers, bans=True)
        self.scenarios.append(Scenario(name, f"refusal: banned IP, {store} store, {workers} worker(s)", "refusal-ban",
                                       workers, "aiohttp", store, port, proc, {"X-API-Key": KEY}, expect=403,
                                       uses_redis=store == "redis", admin_port=admin_port))

    # -- readiness ----------------------------------------------------------------------------

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        for scenario in self.scenarios:
            wait_port(scenario.port, scenario.proc, timeout=max(5.0, deadline - time.monotonic()))
        for scenario in self.scenarios:
            url = f"http://127.0.0.1:{scenario.port}{PATH}"
            if scenario.kind == "refusal-key":
                http_get(url, scenario.headers)  # uses the key's one request of the hour
            if scenario.kind == "refusal-ban":
                self._ban(scenario)
            status = self._settled_status(url, scenario)
            if status != scenario.expect:
                scenario.available = False
                scenario.note = (f"answered {status}, expected {scenario.expect}"
                                 + (": the gateway does not ban yet" if scenario.kind == "refusal-ban" else ""))
                print(f"  {scenario.id}: n/a ({scenario.note})", file=sys.stderr)

    def _settled_status(self, url: str, scenario: Scenario) -> int:
        # With several workers each one may need a moment (and its own first request).
        status = 0
        for _ in range(6 * max(1, scenario.workers)):
            status, _, _ = http_get(url, scenario.headers)
            if status == scenario.expect:
                break
            time.sleep(0.1)
        return status

    def _ban(self, scenario: Scenario) -> None:
        """Earn a ban from this IP with 401s (strikes: 5), as a client hammering with a bad key."""
        url = f"http://127.0.0.1:{scenario.port}{PATH}"
        for _ in range(12):
            http_get(url, {"X-API-Key": BAD_KEY})
        time.sleep(0.3)

    def gateway_counters(self, scenario: Scenario) -> dict[str, float]:
        """Store errors and fallback decisions so far (they mean a Redis run was not on Redis)."""
        if scenario.admin_port is None:
            return {}
        try:
            _, _, body = http_get(f"http://127.0.0.1:{scenario.admin_port}/metrics", timeout=5)
        except OSError:
            return {}
        counters: dict[str, float] = {}
        for line in body.decode().splitlines():
            for name in ("gateway_store_errors_total", "gateway_store_fallback_decisions_total", "gateway_requests_total",
                         "gateway_admission_duration_seconds_count"):
                if line.startswith(name + "{") or line.startswith(name + " "):
                    labels = line[len(name):].rsplit(" ", 1)[0]
                    short = name.removeprefix("gateway_").removesuffix("_total").removesuffix("_seconds_count")
                    counters[short + labels] = float(line.rsplit(" ", 1)[1])
        return counters

    def stop_systems(self) -> None:
        """Stop every system under test; keep Redis and the upstream."""
        for proc in reversed(self.procs):
            if proc is not self.redis and proc is not self.upstream:
                proc.stop()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
