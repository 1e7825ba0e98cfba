"""Workspace-scoped limits across plans, on every store: keys of one workspace whose plans
define a workspace limit alike share exactly one budget (the config loader refuses plans that
define it differently: tests/data/config/workspace_limit_differs_across_plans.yaml), and the
configuration that used to over-admit (rpm 5/1h for one key, 5/10s for another) is refused."""

from __future__ import annotations

import pytest

from gateway.admission.buckets import build_plan
from gateway.config.loader import ConfigError, load_config_text
from tests.store.conftest import Backend, DrivenClock

pytestmark = pytest.mark.anyio


def config(window_a: str, window_b: str) -> str:
    return f"""
upstream: {{url: "http://127.0.0.1:9"}}
store: {{prefix: t}}
keys:
  - {{id: a, key: key-a-demo, plan: one, workspace: acme}}
  - {{id: b, key: key-b-demo, plan: two, workspace: acme}}
plans:
  one: {{limits: {{rpm: {{rate: "5/{window_a}", scope: workspace}}, extra: {{concurrency: 9}}}}}}
  two: {{limits: {{rpm: {{rate: "5/{window_b}", scope: workspace}}}}}}
routes:
  - {{path: /v1/**, limits: [rpm, extra]}}
"""


def test_plans_that_define_a_workspace_limit_differently_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(config("1h", "10s"), "t.yaml")
    assert len(caught.value.problems) == 1
    assert 'workspace limit "rpm" rate 5/10s' in caught.value.problems[0]


async def test_keys_of_one_workspace_on_two_plans_share_one_budget(backend: Backend, clock: DrivenClock) -> None:
    loaded = load_config_text(config("10s", "10s"), "t.yaml")
    route = loaded.routes[0]
    plan_a, plan_b = (build_plan(loaded, key, route) for key in loaded.keys)
    assert plan_a.rates == plan_b.rates  # one bucket
    store = await backend.started(clock=clock)
    admitted = {"a": 0, "b": 0}
    for second in range(160):  # 40 s: 4 windows, both keys asking every 250 ms
        for name, plan in (("a", plan_a), ("b", plan_b)):
            result = await store.admit(plan.rates, plan.slots, f"{name}-{second}")
            if result.admitted:
                admitted[name] += 1
                store.release(plan.slots, f"{name}-{second}")
        clock.advance_ms(250)
    await store.flush()
    assert sum(admitted.values()) == 5 * 4  # 5 per 10 s for the workspace, not per plan
