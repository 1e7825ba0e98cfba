"""Draw docs/benchmarks/results.png from a run's chart.json (matplotlib, from bench/.venv).

    bench/.venv/bin/python bench/chart.py bench/build/<run>/chart.json docs/benchmarks/results.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"direct": "#888888", "nginx": "#2ca02c", "bare": "#1f77b4", "gw-memory": "#ff7f0e", "gw-redis": "#d62728",
           "refuse": "#9467bd"}


def colour(sid: str) -> str:
    for prefix, value in COLOURS.items():
        if sid.startswith(prefix):
            return value
    return "#333333"


def main(data_path: str, out_path: str) -> int:
    with open(data_path) as file:
        data = json.load(file)
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    (ax_t, ax_l), (ax_m, ax_k) = axes

    # 1. Closed-loop throughput, log scale (nginx and the direct upstream are 10x the Python proxies).
    rows = data["throughput"]
    names = [r["id"] for r in rows]
    values = [r["rps"] for r in rows]
    errs = [[r["rps"] - r["min"] for r in rows], [r["max"] - r["rps"] for r in rows]]
    ax_t.barh(names, values, xerr=errs, color=[colour(n) for n in names])
    ax_t.set_xscale("log")
    ax_t.invert_yaxis()
    ax_t.set_xlabel("requests/s (closed loop, wrk; median of repeats, min–max bars; log scale)")
    ax_t.set_title("Throughput")
    for y, v in enumerate(values):
        ax_t.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
    ax_t.tick_params(axis="y", labelsize=7)

    # 2. Latency at 50 % of the bare proxy's capacity: p50 and p99 per scenario.
    lat = data["latency"]
    labels = [f"{r['id']}\n@{r['offered']:,.0f} rps" for r in lat]
    xs = range(len(lat))
    ax_l.bar([x - 0.2 for x in xs], [r["p50"] / 1000 for r in lat], width=0.4, label="p50", color=[colour(r["id"]) for r in lat])
    ax_l.bar([x + 0.2 for x in xs], [r["p99"] / 1000 for r in lat], width=0.4, label="p99", color=[colour(r["id"]) for r in lat],
             alpha=0.45, hatch="//")
    ax_l.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=6)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("ms (open loop, from intended send time; log scale)")
    ax_l.set_title("Latency at 50 % of the bare proxy's capacity (solid p50, hatched p99)")

    # 3. Redis memory per rate bucket vs the limit size.
    limits = data["limits"]
    if limits:
        ax_m.loglog([r["limit"] for r in limits], [r["bytes_per_bucket"] for r in limits], "o-", color="#d62728", label="exact sliding log")
        ax_m.loglog([r["limit"] for r in limits], [r["limit"] * 110 for r in limits], ":", color="#555555", label="110 B × N (goal bound)")
        for r in limits:
            ax_m.annotate(f"{r['bytes_per_bucket']:,.0f} B", (r["limit"], r["bytes_per_bucket"]), fontsize=7,
                          textcoords="offset points", xytext=(4, -10))
        counters = data.get("counter_limits") or []
        if counters:
            ax_m.loglog([r["limit"] for r in counters], [r["bytes_per_bucket"] for r in counters], "s--",
                        color="#1f77b4", label="exact: false (sliding-window counter)")
        ax_m.set_xlabel("rate limit N (entries held by a full bucket)")
        ax_m.set_ylabel("Redis MEMORY USAGE (bytes)")
        ax_m.set_title("Redis memory per full rate bucket")
        ax_m.legend(fontsize=8)

    # 4. Admission cost vs active keys.
    keys = data["keys"]
    if keys:
        ks = [r["active_keys"] for r in keys]
        ax_k.semilogx(ks, [r["rps"] for r in keys], "o-", color="#d62728", label="rps (gateway, Redis, 1 worker)")
        ax_k.set_xlabel("active keys (rotating, wrk Lua)")
        ax_k.set_ylabel("requests/s")
        ax_k.set_ylim(bottom=0)
        twin = ax_k.twinx()
        twin.semilogx(ks, [r["gateway_cpu_us_per_request"] for r in keys], "s--", color="#1f77b4", label="gateway CPU-µs/request")
        twin.semilogx(ks, [r["redis_us_per_evalsha"] for r in keys], "^:", color="#2ca02c", label="Redis µs per EVALSHA")
        twin.set_ylabel("µs")
        twin.set_ylim(bottom=0)
        ax_k.set_title("Admission cost vs active keys")
        lines = ax_k.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax_k.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")

    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
