"""What an admitted request is finally charged, decided when the upstream's headers arrive.

The route's price (`Charge.cost`) stands unless the upstream says otherwise: its
`upstream.cost_header` (first value, an integer 0..MAX_COST; larger is held to MAX_COST,
anything else is ignored) replaces it, and under `charge: success_only` a non-2xx answer is
settled to 0. An exchange that gets no answer at all (upstream unavailable or timed out, the
client gone or cut) settles as a non-2xx answer would: 0 under `success_only`, else the price.
The upstream's header never reaches the client; the gateway's `cost_response_header` does,
on every proxied response, with the settled charge. Pure: the store hears of the settlement
with the release (gateway/admission/controller.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway import trusted_headers
from gateway.config.model import Config
from gateway.store.base import MAX_COST
from gateway.trusted_headers import EncodedHeaders

Headers = list[tuple[bytes, bytes]]

_DIGITS = 7  # more digits than that is held to MAX_COST without converting a long number


def declared_cost(value: bytes) -> int | None:
    """An upstream's declared cost: the first comma-separated value as a plain decimal
    integer, held to MAX_COST; None for anything else."""
    text = value.split(b",", 1)[0].strip()
    if not text or not text.isdigit():  # bytes.isdigit: ASCII digits only (no sign, no space)
        return None
    stripped = text.lstrip(b"0") or b"0"
    return MAX_COST if len(stripped) > _DIGITS else min(MAX_COST, int(stripped))


@dataclass(frozen=True, slots=True)
class CostPolicy:
    """Built once per config."""

    declared: bytes | None  # the upstream's cost header, lower-case (None: not read)
    response: bytes  # the header telling the client its charge, lower-case
    success_only: bool
    # `response` passes the pre-encoded block's check with any number (gateway/trusted_headers.py):
    # the charge line can join an EncodedHeaders block unchecked.
    encodable: bool = False
    # Nothing in the upstream's answer changes the charge (no cost header read, no
    # `success_only`): every exchange is charged its price, known at admission.
    flat: bool = False

    @classmethod
    def from_config(cls, config: Config) -> CostPolicy:
        declared = config.upstream.cost_header
        response = config.cost_response_header.lower().encode("latin-1")
        success_only = config.upstream.charge == "success_only"
        return cls(
            declared.lower().encode("latin-1") if declared else None,
            response,
            success_only,
            trusted_headers.encode([(response, b"0")]) is not None,  # only digits vary
            flat=not declared and not success_only,
        )

    def unanswered(self, price: int) -> int:
        """The charge of an exchange that got no upstream answer."""
        return 0 if self.success_only else price

    def settle(self, price: int, status: int, headers: Headers) -> tuple[int, Headers]:
        """(the settled charge, the client's headers without the upstream's cost header) for an
        upstream answer of `status` with `headers` (names in the upstream's case)."""
        settled = price
        declared = self.declared
        if declared is not None:
            found = None
            kept: Headers = []
            for header in headers:
                if header[0].lower() == declared:
                    if found is None:
                        found = header[1]
                    continue
                kept.append(header)
            if found is not None:
                headers = kept
                value = declared_cost(found)
                if value is not None:
                    settled = value
        if self.success_only and not 200 <= status < 300:
            settled = 0
        return settled, headers

    def header(self, settled: int) -> tuple[bytes, bytes]:
        return (self.response, b"%d" % settled)

    def with_header(self, extra: Sequence[tuple[bytes, bytes]], settled: int) -> Sequence[tuple[bytes, bytes]]:
        """`extra` (the gateway's own response headers) and the charge header: one block still
        when `extra` is one (the charge line joins it without a check), else a list."""
        if self.encodable and isinstance(extra, EncodedHeaders):
            return EncodedHeaders(b"%s%s: %d\r\n" % (extra.block, self.response, settled))
        return [*extra, self.header(settled)]


class Settles(Protocol):
    settled: int | None  # an admission ticket's (gateway/admission/controller.py)


class RequestBill:
    """One admitted request's charge as the forwarder settles it, written to its ticket (whose
    release carries it to the store)."""

    __slots__ = ("_policy", "_price", "_ticket")

    def __init__(self, policy: CostPolicy, price: int, ticket: Settles) -> None:
        self._policy = policy
        self._price = price
        self._ticket = ticket
        ticket.settled = policy.unanswered(price)  # until an answer says otherwise

    @property
    def settled(self) -> int:
        return self._price if self._ticket.settled is None else self._ticket.settled

    def answered(self, status: int, headers: Headers) -> Headers:
        """Settle by the upstream's answer; the client's headers (the upstream's cost header
        gone). The charge header goes with the gateway's own: `with_charge`."""
        settled, headers = self._policy.settle(self._price, status, headers)
        self._ticket.settled = settled
        return headers

    def with_charge(self, extra: Sequence[tuple[bytes, bytes]]) -> Sequence[tuple[bytes, bytes]]:
        """`extra` (the gateway's own headers) and the charge header as settled so far."""
        return self._policy.with_header(extra, self.settled)
