"""Pricing.charge (gateway/admission/cost.py) against a plain reference: the first rule whose
every condition holds wins, the query decoded as application/x-www-form-urlencoded, repeated
parameters and headers match on any value, header values stripped. Plus hostile inputs."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admission.cost import FLAT, Pricing, pricing_for
from gateway.config.model import CostRule
from gateway.store.base import ONE, Charge

RULES = (
    CostRule(25, 2, query=(("js_render", "true"), ("premium_proxy", "true"))),
    CostRule(5, 2, query=(("js_render", "true"),)),
    CostRule(10, query=(("premium_proxy", "true"),)),
    CostRule(7, method="POST", headers=(("x-tier", "gold"),)),
    CostRule(0, query=(("free", ""),)),
)
CREDITS = Pricing(RULES)


def reference(rules: tuple[CostRule, ...], method: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> Charge:
    """The same semantics, the slow obvious way: the standard library's form decoding."""
    params: dict[bytes, set[bytes]] = {}
    text = query.decode("latin-1")  # bytes kept as they are: parse_qsl works on str
    for name, value in parse_qsl(text, keep_blank_values=True, encoding="latin-1", errors="strict"):
        params.setdefault(name.encode("latin-1"), set()).add(value.encode("latin-1"))
    fields: dict[bytes, set[bytes]] = {}
    for name, value in headers:
        fields.setdefault(name, set()).add(value.strip(b" \t"))
    for rule in rules:
        if rule.method is not None and rule.method != method:
            continue
        if all(v.encode() in params.get(n.encode(), set()) for n, v in rule.query) and all(
            v.encode() in fields.get(n.encode(), set()) for n, v in rule.headers
        ):
            return Charge(rule.cost, rule.slots)
    return ONE


def test_the_issue_example_prices() -> None:
    assert CREDITS.charge("GET", b"url=x&js_render=true&premium_proxy=true", []) == Charge(25, 2)
    assert CREDITS.charge("GET", b"js_render=true", []) == Charge(5, 2)
    assert CREDITS.charge("GET", b"premium_proxy=true", []) == Charge(10, 1)
    assert CREDITS.charge("GET", b"url=x", []) is ONE
    assert CREDITS.charge("GET", b"", []) is ONE


def test_form_decoding_of_names_and_values() -> None:
    assert CREDITS.charge("GET", b"js%5Frender=%74rue", []) == Charge(5, 2)
    assert CREDITS.charge("GET", b"js_render=TRUE", []) is ONE  # exact
    spaced = Pricing((CostRule(3, query=(("q", "a b+c"),)),))
    assert spaced.charge("GET", b"q=a+b%2Bc", []) == Charge(3, 1)
    assert spaced.charge("GET", b"q=a%20b%2bc", []) == Charge(3, 1)
    assert spaced.charge("GET", b"q=a+b+c", []) is ONE
    utf8 = Pricing((CostRule(4, query=(("city", "Zürich"),)),))
    assert utf8.charge("GET", b"city=Z%C3%BCrich", []) == Charge(4, 1)
    assert utf8.charge("GET", b"city=Z%FCrich", []) is ONE  # latin-1 bytes are not the UTF-8 text


def test_a_repeated_parameter_matches_on_any_value() -> None:
    assert CREDITS.charge("GET", b"js_render=false&js_render=true", []) == Charge(5, 2)
    assert CREDITS.charge("GET", b"js_render=true&js_render=false", []) == Charge(5, 2)


def test_an_empty_value_is_given_with_or_without_the_equals_sign() -> None:
    assert CREDITS.charge("GET", b"free=", []) == Charge(0, 1)
    assert CREDITS.charge("GET", b"a=1&free&b=2", []) == Charge(0, 1)
    assert CREDITS.charge("GET", b"free=no", []) is ONE


def test_headers_and_method() -> None:
    gold = [(b"x-tier", b"  gold\t")]
    assert CREDITS.charge("POST", b"", gold) == Charge(7, 1)
    assert CREDITS.charge("GET", b"", gold) is ONE  # the rule says POST
    assert CREDITS.charge("POST", b"", [(b"x-tier", b"silver"), (b"x-tier", b"gold")]) == Charge(7, 1)
    assert CREDITS.charge("POST", b"", [(b"x-tier", b"Gold")]) is ONE
    assert CREDITS.charge("POST", b"x-tier=gold", []) is ONE  # a header, not a parameter


def test_hostile_queries_never_raise() -> None:
    for query in (
        b"%", b"%%", b"%zz=%g1", b"js_render=%E2%82", b"\xff\xfe=\x00", b"&&&===&", b"=true",
        b"js_render=tru%65%", b"js_render" + b"=" * 1000, b"a=" + b"%" * 16_000,
        b"&".join(b"js_render=false" for _ in range(1000)) + b"&js_render=true",
    ):
        assert CREDITS.charge("GET", query, [(b"\xff", b"\x00")]) == reference(RULES, "GET", query, [])
    assert CREDITS.charge("GET", b"js_render=%74%72%75%65", []) == Charge(5, 2)
    assert CREDITS.charge("GET", b"js_render=%7", []) is ONE  # a malformed escape stays as written


def test_no_rules_is_flat_and_one_pricing_per_rule_list() -> None:
    assert FLAT.charge("GET", b"js_render=true", [(b"x-tier", b"gold")]) is ONE
    assert pricing_for(()) is FLAT
    assert pricing_for(RULES) is pricing_for(tuple(RULES))


# -- against the reference -----------------------------------------------------------------------

NAMES = ["js_render", "premium_proxy", "free", "q", "é", "a b"]
VALUES = ["true", "false", "", "gold", "a+b", "ü", "%41"]
HEADER_NAMES = [b"x-tier", b"x-mode", b"accept"]


def encode_part(text: str, draw_style: int) -> bytes:
    """One of the ways a client may write the same text."""
    if draw_style == 0:
        return quote(text, safe="").encode()
    if draw_style == 1:
        return quote(text, safe=" ").replace(" ", "+").encode()
    return text.encode("utf-8")  # raw (may contain '+' and '%' read as escapes: both sides agree)


@st.composite
def rules(draw: st.DrawFn) -> tuple[CostRule, ...]:
    rule = st.builds(
        CostRule,
        cost=st.integers(0, 1000),
        slots=st.integers(1, 64),
        method=st.sampled_from([None, "GET", "POST"]),
        query=st.dictionaries(st.sampled_from(NAMES), st.sampled_from(VALUES), max_size=3).map(
            lambda d: tuple(d.items())
        ),
        headers=st.dictionaries(
            st.sampled_from([n.decode() for n in HEADER_NAMES]), st.sampled_from(["gold", "", "a b"]), max_size=2
        ).map(lambda d: tuple(d.items())),
    )
    return tuple(draw(st.lists(rule, max_size=6)))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    parts = []
    for name, value, style in draw(
        st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES), st.integers(0, 2)), max_size=6)
    ):
        parts.append(encode_part(name, style) + b"=" + encode_part(value, style))
    parts += draw(st.lists(st.binary(max_size=8), max_size=2))  # garbage parameters
    query = b"&".join(draw(st.permutations(parts)))
    headers = draw(
        st.lists(st.tuples(st.sampled_from(HEADER_NAMES), st.sampled_from([b"gold", b" gold ", b"", b"a b", b"\xff"])),
                 max_size=4)
    )
    return draw(st.sampled_from(["GET", "POST", "PUT"])), query, headers


@settings(max_examples=400, deadline=None)
@given(rules(), requests())
def test_pricing_agrees_with_the_reference(rule_list: tuple[CostRule, ...], request: tuple) -> None:
    method, query, headers = request
    assert Pricing(rule_list).charge(method, query, headers) == reference(rule_list, method, query, headers)


class Untouchable(bytes):
    def split(self, *args: object, **kwargs: object) -> list[bytes]:  # type: ignore[override]
        raise AssertionError("the query was parsed")


class UntouchableHeaders(list):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the headers were read")


def test_nothing_is_parsed_that_no_rule_tests() -> None:
    query, headers = Untouchable(b"js_render=true"), UntouchableHeaders([(b"x-tier", b"gold")])
    assert FLAT.charge("GET", query, headers) is ONE
    assert Pricing((CostRule(3, method="POST"),)).charge("POST", query, headers) == Charge(3, 1)
    by_header = Pricing((CostRule(4, headers=(("x-tier", "gold"),)),))
    assert by_header.charge("GET", query, [(b"x-tier", b"gold")]) == Charge(4, 1)
    by_query = Pricing((CostRule(5, query=(("js_render", "true"),)),))
    assert by_query.charge("GET", b"js_render=true", headers) == Charge(5, 1)
