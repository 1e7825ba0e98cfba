"""build_plan for issue 18: quota buckets and their names, counts_cost / shadow carried to the
store buckets and BucketInfo, the refusal status, and one Pricing per route."""

from __future__ import annotations

from gateway.admission.buckets import build_plan, hash_tag, short_hash
from gateway.admission.cost import FLAT
from gateway.config.model import (
    ConcurrencyLimit,
    Config,
    CostRule,
    Key,
    Plan,
    QuotaLimit,
    RateLimit,
    Route,
    Upstream,
)
from gateway.store.base import QuotaBucket, RateBucket, SlotBucket

PRO = Plan("pro", {
    "credits": QuotaLimit("credits", 1000, "month", scope="workspace"),
    "daily": QuotaLimit("daily", 50, "1d", counts="requests", status=429),
    "trial": QuotaLimit("trial", 5, "7d", status=403, shadow=True),
    "burn": RateLimit("burn", 100, 60.0, counts="cost", shadow=True),
    "rpm": RateLimit("rpm", 10, 60.0, exact=False),
    "slots": ConcurrencyLimit("slots", 4, wait=2.0),
    "tight": ConcurrencyLimit("tight", 2, wait=9.0, shadow=True),
})
FREE = Plan("free", {"credits": QuotaLimit("credits", 100, "month", scope="workspace")})
RULES = (CostRule(5, 2, query=(("js_render", "true"),)), CostRule(1))
ROUTE = Route("/v1/**", None, ("trial", "credits", "daily", "burn", "rpm", "slots", "tight"), cost=RULES)
OTHER = Route("/v2/**", None, ("credits", "daily"), per_route=frozenset({"daily"}), cost=RULES)
PLAIN = Route("/v3/**", None, ("credits",))
ALICE = Key("alice", "a" * 64, "pro", workspace="acme", overrides={"credits": 300, "daily": 20})
BOB = Key("bob", "b" * 64, "pro", workspace="acme")
CAROL = Key("carol", "c" * 64, "free")
CONFIG = Config(
    upstream=Upstream("http://127.0.0.1:9000"), keys=(ALICE, BOB, CAROL),
    plans={"pro": PRO, "free": FREE}, routes=(ROUTE, OTHER, PLAIN),
)


def test_quota_buckets_follow_the_naming_scheme_and_scopes() -> None:
    alice, bob = build_plan(CONFIG, ALICE, ROUTE), build_plan(CONFIG, BOB, ROUTE)
    tag = hash_tag("gw", ALICE)
    own = f"{tag}:k:{short_hash('alice')}"
    # trial (key scope), credits (workspace, then alice's own cap inside it), daily (key scope)
    assert [q.key for q in alice.quotas] == [
        f"{own}:q:trial", f"{tag}:w:q:credits", f"{own}:q:credits", f"{own}:q:daily",
    ]
    assert [(q.limit, q.period, q.counts_cost, q.shadow) for q in alice.quotas] == [
        (5, "7d", True, True), (1000, "month", True, False), (300, "month", True, False), (20, "1d", False, False),
    ]
    assert [i.policy for i in alice.quota_info] == ["trial", "credits", "credits.key", "daily"]
    assert [i.name for i in alice.quota_info] == ["trial", "credits", "credits", "daily"]
    assert all(i.window == 0.0 for i in alice.quota_info) and alice.quota_info[0].period == "7d"
    # the workspace balance is one store key for every key of the workspace; the caps are not
    assert alice.quotas[1] == bob.quotas[1] and alice.quotas[0].key != bob.quotas[0].key
    assert len(bob.quotas) == 3  # no override, no cap
    # every key of one admission shares one hash tag (one Lua script on Redis Cluster)
    buckets = [*alice.rates, *alice.slots, *alice.quotas]
    assert len({b.key[b.key.index("{") : b.key.index("}") + 1] for b in buckets}) == 1


def test_a_per_route_quota_gets_the_route_suffix() -> None:
    on_route, elsewhere = build_plan(CONFIG, BOB, OTHER).quotas[1], build_plan(CONFIG, BOB, ROUTE).quotas[2]
    assert on_route.key.startswith(elsewhere.key + ":p:")


def test_counts_cost_and_shadow_reach_the_store_buckets_and_infos() -> None:
    plan = build_plan(CONFIG, BOB, ROUTE)
    assert plan.rates == (
        RateBucket(plan.rates[0].key, 100, 60_000, True, counts_cost=True, shadow=True),
        RateBucket(plan.rates[1].key, 10, 60_000, False),
    )
    assert plan.rates[1].key.endswith(":a:rpm")
    assert [(i.counts_cost, i.shadow, i.name) for i in plan.rate_info] == [(True, True, "burn"), (False, False, "rpm")]
    assert [s.shadow for s in plan.slots] == [False, True]
    assert plan.slots[0] == SlotBucket(plan.slots[0].key, 4)
    assert [i.shadow for i in plan.slot_info] == [False, True]


def test_a_shadow_limit_neither_makes_a_request_wait_nor_picks_the_refusal_status() -> None:
    plan = build_plan(CONFIG, BOB, ROUTE)
    assert plan.wait == 2.0  # not the shadow limit's 9 s
    assert plan.quota_status == 402  # credits (enforced) comes before daily; trial is shadow
    assert build_plan(CONFIG, BOB, Route("/x", None, ("trial", "daily"))).quota_status == 429
    assert build_plan(CONFIG, BOB, Route("/x", None, ("trial",))).quota_status == 402
    assert not build_plan(CONFIG, BOB, Route("/x", None, ("trial",))).empty  # a shadow quota still counts


def test_one_pricing_per_route_shared_by_every_plan_and_key() -> None:
    pricings = {id(build_plan(CONFIG, key, route).pricing) for key in (ALICE, BOB, CAROL) for route in (ROUTE,)}
    assert len(pricings) == 1
    assert build_plan(CONFIG, CAROL, ROUTE).pricing.rules == RULES
    assert build_plan(CONFIG, CAROL, PLAIN).pricing is FLAT
    carol = f"{hash_tag('gw', CAROL)}:q:credits"
    assert build_plan(CONFIG, CAROL, PLAIN).quotas == (QuotaBucket(carol, 100, "month"),)
