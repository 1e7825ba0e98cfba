from __future__ import annotations

from gateway.admission.buckets import build_plan, hash_tag
from gateway.admission.headers import limit_headers, policy_header, refusal_message, retry_after_seconds
from gateway.config.model import (
    ConcurrencyLimit,
    Config,
    Job,
    Key,
    Plan,
    RateLimit,
    Route,
    Upstream,
)
from gateway.store.base import AdmitResult

PRO = Plan(
    "pro",
    {
        "rpm": RateLimit("rpm", 60, 60.0, scope="workspace"),
        "burst": RateLimit("burst", 10, 1.0),
        "requests": ConcurrencyLimit("requests", 10, wait=2.0),
        "crawls": ConcurrencyLimit("crawls", 5),
    },
)
FREE = Plan("free", {"rpm": RateLimit("rpm", 10, 60.0), "requests": ConcurrencyLimit("requests", 2)})
ROUTE = Route("/v1/**", None, ("rpm", "burst", "requests", "missing"))
CRAWL = Route(
    "/v1/crawl", frozenset({"POST"}), ("rpm", "burst"), per_route=frozenset({"burst"}),
    job=Job("crawls", "id", "/v1/crawl/{id}", "status", ("completed",), 7200.0),
)
ALICE = Key("alice", "a" * 64, "pro", workspace="acme", overrides={"rpm": 30})
BOB = Key("bob", "b" * 64, "pro", workspace="acme")
CAROL = Key("carol", "c" * 64, "free")
CONFIG = Config(
    upstream=Upstream("http://127.0.0.1:9000"), keys=(ALICE, BOB, CAROL),
    plans={"pro": PRO, "free": FREE}, routes=(CRAWL, ROUTE),
)


def slot(key: str) -> str:
    """The hash tag of a Redis key name: the part between the first { and }."""
    return key[key.index("{") + 1 : key.index("}")]


def test_workspace_scope_is_shared_and_override_adds_a_key_cap() -> None:
    alice = build_plan(CONFIG, ALICE, ROUTE)
    bob = build_plan(CONFIG, BOB, ROUTE)
    # the workspace bucket is the same store key for both keys, with the plan's number
    assert alice.rates[0] == bob.rates[0]
    assert alice.rates[0].limit == 60 and alice.rates[0].window_ms == 60_000
    # alice's override is an extra per-key cap inside the shared budget
    assert [b.limit for b in alice.rates] == [60, 30, 10]
    assert [i.policy for i in alice.rate_info] == ["rpm", "rpm.key", "burst"]
    assert alice.rates[1].key != bob.rates[1].key  # key-scoped burst differs per key
    assert alice.slots[0].key != bob.slots[0].key
    assert alice.wait == 2.0


def test_an_approximate_rate_limit_gets_a_counter_bucket_under_its_own_name() -> None:
    """`exact: false` is counted in a Redis hash, the log in a sorted set: toggling it in a
    reload must name another key (no WRONGTYPE), in the same hash tag."""
    def bucket(exact: bool) -> tuple[str, bool]:
        plan = Plan("free", {"rpm": RateLimit("rpm", 10, 60.0, exact=exact)})
        config = Config(upstream=CONFIG.upstream, keys=(CAROL,), plans={"free": plan}, routes=(ROUTE,))
        (rate,) = build_plan(config, CAROL, ROUTE).rates
        return rate.key, rate.exact

    (log_key, log_exact), (counter_key, counter_exact) = bucket(True), bucket(False)
    assert (log_exact, counter_exact) == (True, False)
    assert log_key.endswith(":r:rpm") and counter_key.endswith(":a:rpm")
    assert slot(log_key) == slot(counter_key)


def test_every_key_of_one_admission_shares_one_hash_tag() -> None:
    for key in (ALICE, BOB, CAROL):
        for route in (ROUTE, CRAWL):
            plan = build_plan(CONFIG, key, route)
            names = [b.key for b in plan.rates] + [b.key for b in plan.slots]
            assert names and len({slot(n) for n in names}) == 1
            assert all(n.startswith(hash_tag("gw", key)) for n in names)


def test_ids_never_appear_in_key_names() -> None:
    key = Key("acme-{live}", "d" * 64, "free")
    plan = build_plan(CONFIG, key, ROUTE)
    assert all("acme" not in b.key and "live" not in b.key for b in plan.rates + plan.slots)  # type: ignore[operator]


def test_unknown_limit_names_are_skipped_and_job_limit_added() -> None:
    carol = build_plan(CONFIG, CAROL, CRAWL)  # free has no burst and no crawls
    assert [b.limit for b in carol.rates] == [10]
    assert carol.slots == ()
    alice = build_plan(CONFIG, ALICE, CRAWL)
    assert [i.policy for i in alice.slot_info] == ["crawls"]


def test_per_route_buckets_get_their_own_key() -> None:
    general = build_plan(CONFIG, CAROL.__class__("dave", "e" * 64, "pro"), ROUTE)
    crawl = build_plan(CONFIG, CAROL.__class__("dave", "e" * 64, "pro"), CRAWL)
    burst_general = [b.key for b, i in zip(general.rates, general.rate_info, strict=True) if i.policy == "burst"][0]
    burst_crawl = [b.key for b, i in zip(crawl.rates, crawl.rate_info, strict=True) if i.policy == "burst"][0]
    rpm_general = [b.key for b, i in zip(general.rates, general.rate_info, strict=True) if i.policy == "rpm"][0]
    rpm_crawl = [b.key for b, i in zip(crawl.rates, crawl.rate_info, strict=True) if i.policy == "rpm"][0]
    assert burst_general != burst_crawl  # per_route
    assert rpm_general == rpm_crawl  # shared by limit name


def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in headers}


ALL = frozenset({"concurrency", "x-concurrent", "x-ratelimit", "ietf"})


def test_headers_of_an_admitted_request() -> None:
    plan = build_plan(CONFIG, CAROL, ROUTE)  # rpm 10/60s, requests 2
    result = AdmitResult(True, None, 0, rate_counts=[3], rate_reset_ms=[41_200], slot_counts=[0])
    h = as_dict(limit_headers(plan, result, ALL, policy_header(plan)))
    assert h["concurrency-limit"] == "2" and h["concurrency-remaining"] == "1"
    assert h["x-concurrent-current"] == "1" and h["x-concurrent-remaining"] == "1"
    assert h["x-ratelimit-limit"] == "10" and h["x-ratelimit-remaining"] == "6"
    assert h["x-ratelimit-reset"] == "42"
    assert h["ratelimit-policy"] == '"rpm";q=10;w=60, "requests";q=2;qu="concurrent-requests"'
    assert h["ratelimit"] == '"rpm";r=6;t=42, "requests";r=1'


def test_headers_of_a_rate_refusal_describe_the_refusing_bucket() -> None:
    plan = build_plan(CONFIG, ALICE, ROUTE)  # ws rpm 60, key rpm 30, burst 10
    result = AdmitResult(False, "rate", 12_300, rate_counts=[40, 30, 2], rate_reset_ms=[5_000, 9_000, 800],
                         slot_counts=[4])
    h = as_dict(limit_headers(plan, result, ALL, policy_header(plan)))
    assert h["x-ratelimit-limit"] == "30" and h["x-ratelimit-remaining"] == "0"
    assert h["x-ratelimit-reset"] == "13"  # never earlier than Retry-After
    assert retry_after_seconds(result) == 13
    assert '"rpm.key";r=0;t=13' in h["ratelimit"]
    # a refused request holds no slot: 4 held of 10 (not 5, as if it were in flight)
    assert h["concurrency-remaining"] == "6" and h["x-concurrent-current"] == "4"
    assert refusal_message(plan, result) == "You have exceeded 30 requests per 1m on the pro plan."


def test_headers_of_a_concurrency_refusal() -> None:
    plan = build_plan(CONFIG, CAROL, ROUTE)
    result = AdmitResult(False, "concurrency", 0, rate_counts=[1], rate_reset_ms=[1000], slot_counts=[2])
    h = as_dict(limit_headers(plan, result, ALL, policy_header(plan)))
    assert h["concurrency-remaining"] == "0" and h["x-concurrent-current"] == "2"
    assert refusal_message(plan, result) == "All 2 concurrent request slots of the free plan are in use."


def test_families_can_be_chosen() -> None:
    plan = build_plan(CONFIG, CAROL, ROUTE)
    result = AdmitResult(True, None, 0, rate_counts=[0], rate_reset_ms=[60_000], slot_counts=[0])
    names = {k for k, _ in limit_headers(plan, result, frozenset({"x-concurrent"}), policy_header(plan))}
    assert names == {b"x-concurrent-limit", b"x-concurrent-current", b"x-concurrent-remaining"}


def test_ietf_window_is_whole_seconds_rounded_up() -> None:
    """draft-ietf-httpapi-ratelimit-headers wants `w` in whole seconds: 5/1500ms is announced
    as 5 per 2 s (never a faster rate than the real one), 50/250ms as 50 per 1 s."""
    from gateway.admission.buckets import AdmissionPlan, BucketInfo
    from gateway.store.base import RateBucket

    def policy(window_ms: int) -> str:
        info = BucketInfo("r", 5, window_ms / 1000)
        plan = AdmissionPlan("p", (RateBucket("k", 5, window_ms),), (info,), (), (), 0.0)
        value = policy_header(plan)
        assert value is not None
        return value.decode()

    assert policy(1500) == '"r";q=5;w=2'
    assert policy(250) == '"r";q=5;w=1'
    assert policy(60_000) == '"r";q=5;w=60'
    assert policy(60_001) == '"r";q=5;w=61'
