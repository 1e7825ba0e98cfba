"""The benchmark harness of issue 6: one command, every scenario side by side, in one run.

    bench/run            # the full run (about 15 minutes on 2 cores), writes docs/benchmarks.md
    bench/run --quick    # a smoke run (about 2 minutes)

Phases, each interleaving its scenarios (A B C … A B C) so drift hits all of them alike:
1. closed loop (wrk): capacity, CPU-µs per request per process, Redis commands per request;
2. open loop (bench/loadgen): latency percentiles at 25/50/75 % of the bare proxy's capacity;
3. scaling (bench/scaling.py): Redis memory per key by limit size, admission cost by active keys;
4. profile (py-spy) of a gateway worker under load (saturated, and at 25 % load).
Results: bench/build/<run>/results.json; docs/benchmarks.md (results section) and
docs/benchmarks/results.png are rewritten from it (`--report-only RESULTS_JSON` re-renders).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import costs
import instructions
import loads
import profiling
import redis
import report
import scaling
import stack
from stack import BENCH_DIR, LOAD_CPUS, PATH, ROOT, Scenario, Stack


class Settings:
    def __init__(self, quick: bool, args: argparse.Namespace) -> None:
        self.quick = quick
        self.closed_seconds = args.closed_seconds or (3 if quick else 5)
        self.repeats = args.repeats or (1 if quick else 3)
        self.open_seconds = args.open_seconds or (4 if quick else 7)
        self.open_warmup = 1.0
        self.fractions = (0.5,) if quick else (0.25, 0.5, 0.75)
        self.connections = args.connections
        self.open_connections = 64
        self.profile = (not quick or args.profile) and not args.no_profile
        self.scaling = not args.no_scaling
        self.only = args.only


def redis_stats(client: redis.Redis) -> dict[str, float]:
    """Commands by name (calls) and the read events Redis processed (≈ round trips received)."""
    stats: dict[str, float] = {}
    for name, values in client.info("commandstats").items():
        stats[name.removeprefix("cmdstat_")] = float(values["calls"])
    stats["_reads"] = float(client.info("stats")["total_reads_processed"])
    return stats


def machine() -> dict[str, Any]:
    def run(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip()
        except OSError:
            return "?"

    model = next((line.split(":", 1)[1].strip() for line in run(["lscpu"]).splitlines() if line.startswith("Model name")), "?")
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    versions = run([os.path.join(ROOT, ".venv", "bin", "python"), "-c",
                    "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
                    "('uvicorn','uvloop','httptools','aiohttp','httpx','httpcore','redis','hiredis','prometheus-client')))"])
    return {
        "cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "nginx": run(["nginx", "-v"]).replace("nginx version: ", ""),
        "redis": run(["redis-server", "--version"]).split(" sha=")[0],
        "wrk": run(["wrk", "-v"]).splitlines()[0] if run(["wrk", "-v"]) else "?",
        "packages": versions,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "pinned": stack.PIN,
    }


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


class Bench:
    def __init__(self, settings: Settings, run_dir: str) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.stack = Stack(run_dir, settings.quick)
        self.loadgen = os.path.join(BENCH_DIR, "build", "loadgen")
        self.redis: redis.Redis | None = None
        self.results: dict[str, Any] = {"settings": vars(settings) | {"fractions": list(settings.fractions)},
                                        "machine": machine(), "scenarios": {}, "closed": {}, "open": {}}

    # -- set-up -------------------------------------------------------------------------------

    def build(self) -> None:
        s = self.stack
        quick = self.settings.quick
        s.start_base()
        self.redis = redis.Redis(port=s.redis_port)
        s.add_direct()
        s.add_nginx(1)
        if not quick:
            s.add_nginx(2)
        for client in ("aiohttp", "httpx"):
            s.add_bare(client, 1)
            if not quick:
                s.add_bare(client, 2)
        mem = {c: s.add_gateway(c, "memory", 1) for c in ("aiohttp", "httpx")}
        red1 = {c: s.add_gateway(c, "redis", 1) for c in ("aiohttp", "httpx")}
        red2 = {} if quick else {c: s.add_gateway(c, "redis", 2) for c in ("aiohttp", "httpx")}
        s.add_refusal_key(mem["aiohttp"])
        s.add_refusal_key(red1["aiohttp"])
        if not quick:
            s.add_refusal_key(red2["aiohttp"])
        s.add_refusal_ban("memory", 1)
        s.add_refusal_ban("redis", 1)
        if not quick:
            s.add_refusal_ban("redis", 2)
        print(f"starting {len(s.procs)} processes; waiting for them to answer", file=sys.stderr)
        s.wait_ready()
        for sc in s.scenarios:
            self.results["scenarios"][sc.id] = {
                "label": sc.label, "kind": sc.kind, "workers": sc.workers, "client": sc.client, "store": sc.store,
                "expect": sc.expect, "available": sc.available, "note": sc.note,
            }

    @property
    def store(self) -> redis.Redis:
        """The harness's connection to the private Redis (opened in build())."""
        if self.redis is None:
            raise RuntimeError("build() first")
        return self.redis

    def measure_fn(self, scenario: Scenario) -> Callable[[], dict[str, dict[int, float]]]:
        s = self.stack
        procs = {"upstream": s.upstream, "redis": s.redis}
        if scenario.proc is not None:
            procs["sut"] = scenario.proc

        def measure() -> dict[str, dict[int, float]]:
            return {name: proc.cpu() for name, proc in procs.items() if proc is not None}

        return measure

    def warm(self) -> None:
        """One short wrk burst per system: pools filled, code paths warm, before anything counts."""
        for sc in self.stack.scenarios:
            if sc.available:
                loads.run_wrk(f"http://127.0.0.1:{sc.port}{PATH}", seconds=1, connections=self.settings.connections,
                              headers=sc.headers, cpus=LOAD_CPUS)

    # -- phase 1: closed loop -----------------------------------------------------------------

    def closed_loop(self) -> None:
        st = self.settings
        runs = [sc for sc in self.stack.scenarios if sc.available and self._selected(sc.id)]
        total = len(runs) * st.repeats
        done = 0
        for repeat in range(st.repeats):
            for sc in runs:
                done += 1
                print(f"[closed {done}/{total}] {sc.id}", file=sys.stderr)
                record = self._closed_once(sc)
                self.results["closed"].setdefault(sc.id, []).append(record)
                self._save()

    def _closed_once(self, sc: Scenario) -> dict[str, Any]:
        self.store.config_resetstat()
        before = redis_stats(self.store)
        counters = self.stack.gateway_counters(sc)
        result = loads.run_wrk(f"http://127.0.0.1:{sc.port}{PATH}", seconds=self.settings.closed_seconds,
                               connections=self.settings.connections, headers=sc.headers, cpus=LOAD_CPUS,
                               measure=self.measure_fn(sc))
        after = redis_stats(self.store)
        record = asdict(result)
        record["redis"] = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}
        record["gateway"] = _delta(counters, self.stack.gateway_counters(sc))
        return record

    # -- phase 2: open loop -------------------------------------------------------------------

    def _selected(self, scenario_id: str) -> bool:
        return self.settings.only is None or re.search(self.settings.only, scenario_id) is not None

    def capacity(self, scenario_id: str) -> float | None:
        runs = self.results["closed"].get(scenario_id)
        return statistics.median(r["rps"] for r in runs) if runs else None

    def open_plan(self) -> list[tuple[str, str, list[str], list[float]]]:
        """(group, reference bare proxy, scenarios, fractions): every scenario of a group is offered
        the same rates, fractions of its group's bare-proxy capacity."""
        quick = self.settings.quick
        fr = list(self.settings.fractions)
        plan = [
            ("aiohttp, 1 worker", "bare-aiohttp-w1",
             ["direct", "nginx-w1", "bare-aiohttp-w1", "gw-memory-aiohttp-w1", "gw-redis-aiohttp-w1"], fr),
            ("httpx, 1 worker", "bare-httpx-w1", ["bare-httpx-w1", "gw-memory-httpx-w1", "gw-redis-httpx-w1"], fr),
        ]
        if not quick:
            plan += [
                ("aiohttp, 2 workers", "bare-aiohttp-w2", ["nginx-w2", "bare-aiohttp-w2", "gw-redis-aiohttp-w2"], [0.5]),
                ("httpx, 2 workers", "bare-httpx-w2", ["bare-httpx-w2", "gw-redis-httpx-w2"], [0.5]),
            ]
        return plan

    def open_loop(self) -> None:
        by_id = {sc.id: sc for sc in self.stack.scenarios}
        jobs: list[tuple[str, float, float, Scenario]] = []
        plan = self.open_plan()
        self.results["open_plan"] = [{"group": g, "reference": ref, "scenarios": ids, "fractions": fr} for g, ref, ids, fr in plan]
        fractions = sorted({f for _, _, _, fr in plan for f in fr})
        for fraction in fractions:  # interleaved: every group's scenarios at one load level, then the next
            for group, ref, ids, fr in plan:
                capacity = self.capacity(ref)
                if fraction not in fr or not capacity:
                    continue
                for scenario_id in ids:
                    sc = by_id.get(scenario_id)
                    if sc is not None and sc.available and self._selected(sc.id):
                        jobs.append((group, fraction, capacity * fraction, sc))
        for n, (group, fraction, rate, sc) in enumerate(jobs, 1):
            print(f"[open {n}/{len(jobs)}] {sc.id} at {rate:.0f} rps ({fraction:.0%} of {group})", file=sys.stderr)
            self.store.config_resetstat()
            before = redis_stats(self.store)
            counters = self.stack.gateway_counters(sc)
            result = loads.run_loadgen(self.loadgen, sc.port, PATH, rate=rate, seconds=self.settings.open_seconds,
                                       warmup=self.settings.open_warmup, connections=self.settings.open_connections,
                                       headers=sc.headers, cpus=LOAD_CPUS, measure=self.measure_fn(sc))
            after = redis_stats(self.store)
            record = asdict(result)
            record["redis"] = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}
            record["group"], record["fraction"] = group, fraction
            record["gateway"] = _delta(counters, self.stack.gateway_counters(sc))
            self.results["open"].setdefault(group, {}).setdefault(f"{fraction:.2f}", {})[sc.id] = record
            self._save()

    # -- phases 3 and 4 -----------------------------------------------------------------------

    def scaling(self) -> None:
        s = self.stack
        self.results["scaling"] = scaling.run_all(
            run_dir=self.run_dir, redis_port=s.redis_port, upstream_port=s.upstream_port, quick=self.settings.quick,
            seconds=3 if self.settings.quick else 5, connections=self.settings.connections,
        )
        self._save()

    def profile(self) -> None:
        by_id = {sc.id: sc for sc in self.stack.scenarios}
        out: dict[str, Any] = {}
        for scenario_id in ("gw-redis-aiohttp-w1", "gw-memory-aiohttp-w1", "bare-aiohttp-w1"):
            sc = by_id.get(scenario_id)
            if sc is None or not sc.available or sc.proc is None:
                continue
            print(f"[profile] {scenario_id}", file=sys.stderr)
            out[scenario_id] = profiling.profile(sc, self.run_dir, seconds=10, connections=self.settings.connections)
        # The same at a fixed moderate rate, where the Redis store has nothing to coalesce with.
        capacity = self.capacity("bare-aiohttp-w1")
        for scenario_id in ("gw-redis-aiohttp-w1", "gw-memory-aiohttp-w1"):
            sc = by_id.get(scenario_id)
            if capacity and sc is not None and sc.available and sc.proc is not None:
                rate = capacity * 0.25
                print(f"[profile] {scenario_id} at {rate:.0f} rps", file=sys.stderr)
                out[f"{scenario_id} @ 25%"] = profiling.profile(sc, self.run_dir, seconds=8, connections=64, rate=rate,
                                                                loadgen=self.loadgen)
        self.results["profile"] = out
        self._save()

    def _save(self) -> None:
        with open(os.path.join(self.run_dir, "results.json"), "w") as file:
            json.dump(self.results, file, indent=1)


def instruction_run(args: argparse.Namespace) -> int:
    """`--instructions`: the callgrind table alone (about 1.5 minutes per system)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(BENCH_DIR, "build", f"instr-{stamp}")
    bench_stack = Stack(run_dir, quick=False)
    try:
        bench_stack.start_base()
        results = instructions.run(bench_stack, args.instr_phases, args.instr_requests)
    finally:
        bench_stack.stop()
    results["machine"] = machine()
    results["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    with open(os.path.join(run_dir, "instructions.json"), "w") as file:
        json.dump(results, file, indent=1)
    print(instructions.render(results))
    if not args.no_docs:
        instructions.write_docs(results, f"run instr-{stamp}, commit {results['commit']}")
    return 0


def costs_run(args: argparse.Namespace) -> int:
    """`--costs`: cost rules on the admission path, with and without (bench/costs.py)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(BENCH_DIR, "build", f"costs-{stamp}")
    bench_stack = Stack(run_dir, quick=args.quick)
    try:
        bench_stack.start_base()
        results = costs.run(bench_stack, seconds=args.closed_seconds or (3 if args.quick else 5),
                            repeats=args.repeats or (1 if args.quick else 3), connections=args.connections)
        if not args.quick:
            results["instructions"] = costs.instruction_counts(bench_stack, args.instr_phases, args.instr_requests)
    finally:
        bench_stack.stop()
    results["machine"] = machine()
    results["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    with open(os.path.join(run_dir, "costs.json"), "w") as file:
        json.dump(results, file, indent=1)
    print(costs.render(results))
    if not args.no_docs:
        costs.write_docs(results, f"run costs-{stamp}, commit {results['commit']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gateway benchmark harness (issue 6).")
    parser.add_argument("--quick", action="store_true", help="smoke run, about 2 minutes")
    parser.add_argument("--repeats", type=int, default=0, help="closed-loop repeats (default 3; quick 1)")
    parser.add_argument("--closed-seconds", type=float, default=0, help="seconds per closed-loop run (default 5)")
    parser.add_argument("--open-seconds", type=float, default=0, help="measured seconds per open-loop run (default 7)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--only", metavar="REGEX", help="run only the scenarios whose id matches (debugging)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile in --quick mode too")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md and the chart")
    parser.add_argument("--report-only", metavar="RESULTS_JSON", help="re-render the docs from a saved run")
    parser.add_argument("--instructions", action="store_true",
                        help="instead: instructions per request under callgrind (bench/instructions.py)")
    parser.add_argument("--instr-phases", type=int, default=2, help="measured phases per system (default 2)")
    parser.add_argument("--instr-requests", type=int, default=640, help="requests per phase (default 640)")
    parser.add_argument("--costs", action="store_true",
                        help="instead: cost rules on the admission path, with and without (bench/costs.py)")
    args = parser.parse_args(argv)

    if args.instructions:
        return instruction_run(args)
    if args.costs:
        return costs_run(args)

    if args.report_only:
        with open(args.report_only) as file:
            results = json.load(file)
        for sid, summary in results.get("profile", {}).items():
            results["profile"][sid] = profiling.resummarise(summary, ROOT)
        report.write_docs(results, os.path.dirname(os.path.abspath(args.report_only)))
        return 0

    settings = Settings(args.quick, args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(BENCH_DIR, "build", f"run-{stamp}{'-quick' if args.quick else ''}")
    os.makedirs(run_dir, exist_ok=True)
    bench = Bench(settings, run_dir)
    started = time.monotonic()
    try:
        bench.build()
        bench.warm()
        bench.closed_loop()
        bench.open_loop()
        if settings.profile:
            bench.profile()
        bench.stack.stop_systems()  # scaling runs alone, on the same Redis and upstream
        if settings.scaling:
            bench.scaling()
    finally:
        bench.stack.stop()
    bench.results["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    bench.results["elapsed_s"] = round(time.monotonic() - started, 1)
    bench.results["run_dir"] = os.path.relpath(run_dir, ROOT)
    bench._save()
    print(f"results: {os.path.join(run_dir, 'results.json')} ({bench.results['elapsed_s']} s)", file=sys.stderr)
    if not args.no_docs:
        report.write_docs(bench.results, run_dir)
    print(report.summary(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
