"""docs/contract.md against the code, both ways: every status/`error` pair, limit header,
command, admin path and metric the contract names exists in the code, and everything of those
kinds the code produces is in the contract. The tables are parsed from the document."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gateway.admission.buckets import AdmissionPlan, BucketInfo
from gateway.admission.headers import limit_headers, policy_header
from gateway.cli import _parser
from gateway.config.model import HEADER_FAMILIES, QuotaLimit
from gateway.connection_limits import REFUSALS as CONNECTION_REFUSALS
from gateway.metrics import Metrics
from gateway.store.base import AdmitResult, RateBucket, SlotBucket

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = (ROOT / "docs" / "contract.md").read_text()
GATEWAY = ROOT / "gateway"


def section(title: str) -> str:
    """The text from a heading (any level) up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", CONTRACT, re.M)
    assert match, f"no heading {title!r} in docs/contract.md"
    level = len(match.group(1))
    rest = CONTRACT[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def table(title: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table in a section, header and rule left out."""
    rows = [line for line in section(title).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def source_of_gateway() -> str:
    # the example upstream is a separate program (its answers are not the gateway's)
    return "\n".join(p.read_text() for p in GATEWAY.rglob("*.py") if p.name != "example_upstream.py")


def test_every_error_answer_of_the_code_is_in_the_contract_and_back() -> None:
    documented = {(int(row[0]), code_spans(row[1])[0]) for row in table("Responses the gateway makes itself")}
    source = source_of_gateway()
    # send_error(send, STATUS, "error", ...) on the public port; the raw 408 of the header deadline
    calls = re.findall(r"send_error\(\s*send,\s*(\d{3}),\s*\"(\w+)\"", source)
    sent = {(int(status), error) for status, error in calls}
    # the quota refusal's status is the quota's own (`status`, default 402)
    if re.search(r"send_error\(send, plan\.quota_status, \"quota_exceeded\"", source):
        sent.add((QuotaLimit("q", 1, "1d").status, "quota_exceeded"))
    deadline = (GATEWAY / "header_deadline.py").read_text()
    status = re.search(r"HTTP/1\.1 (\d{3})", deadline)
    error = re.search(r"error_body\(\"(\w+)\"", deadline)
    assert status and error
    sent.add((int(status.group(1)), error.group(1)))
    # the head limits' raw answers, made while parsing (gateway/head_limits.py)
    limits = re.findall(r"closing_error\(\s*(\d{3}),\s*\"[^\"]*\",\s*\"(\w+)\"", (GATEWAY / "head_limits.py").read_text())
    assert len(limits) == 5, limits
    sent.update((int(status), error) for status, error in limits)
    # a connection over its bounds, answered at the accept (gateway/connection_limits.py)
    for answer in CONNECTION_REFUSALS.values():
        sent.add((int(answer.split()[1]), json.loads(answer.partition(b"\r\n\r\n")[2])["error"]))
    assert len(sent) >= 14, sent  # the patterns still find the calls
    assert sent == documented, {"in code only": sent - documented, "in the contract only": documented - sent}


def test_every_limit_header_the_code_sends_is_in_the_contract_and_back() -> None:
    rows = table("Limit headers")
    families = {code_spans(row[0])[0] for row in rows if code_spans(row[0])}
    assert families == set(HEADER_FAMILIES)
    documented = {name.lower() for row in rows for name in code_spans(row[1])}

    plan = AdmissionPlan(
        "p", rates=(RateBucket("r", 10, 60_000),), rate_info=(BucketInfo("rpm", 10, 60.0),),
        slots=(SlotBucket("c", 2),), slot_info=(BucketInfo("requests", 2, 0.0),), wait=0.0,
    )
    result = AdmitResult(False, "rate", 5_000, rate_counts=[10], rate_reset_ms=[5_000], slot_counts=[1])
    sent = {name.decode() for name, _ in limit_headers(plan, result, HEADER_FAMILIES, policy_header(plan))}
    sent.add("retry-after")  # gateway/responses.py, with every answer whose table row says so
    assert sent == documented


def test_every_command_is_in_the_contract_and_back() -> None:
    documented = {code_spans(row[0])[0].split()[1] for row in table("2. Command line")}
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert documented == set(commands)


def test_every_admin_path_is_in_the_contract_and_back() -> None:
    documented = {code_spans(row[0])[0] for row in table("5. Admin port")}
    routes = set()
    for path in (GATEWAY / "admin").glob("*.py"):
        for line in path.read_text().splitlines():
            found = re.search(r"Route\(\"([^\"]+)\"", line)
            if found is None:
                continue
            route = found.group(1).replace("{ip:path}", "{ip}").replace("{key_id}", "{id}")
            methods = re.search(r"methods=\[([^\]]*)\]", line)
            for method in re.findall(r"\"(\w+)\"", methods.group(1)) if methods else ["GET"]:
                routes.add(f"{method} {route}")
    assert len(routes) >= 7, routes
    assert routes == documented


def test_every_metric_is_in_the_contract_and_back() -> None:
    documented = {code_spans(row[0])[0]: row[1] for row in table("6. Metrics")}
    registered = {}
    for family in Metrics().registry.collect():
        registered[family.name + ("_total" if family.type == "counter" else "")] = family.type
    assert registered == documented
