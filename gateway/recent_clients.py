"""The client IPs each key was recently used from, for the admin key view ("are its recent
clients banned?"). In-process and bounded: at most `per_key` IPs for each of the `max_keys`
most recently active keys; with several replicas each one knows its own clients."""

from __future__ import annotations

from collections import OrderedDict

from gateway.admission.identity import IPAddress


class RecentClients:
    def __init__(self, per_key: int = 8, max_keys: int = 10_000) -> None:
        self._per_key = per_key
        self._max_keys = max_keys
        self._by_key: OrderedDict[str, OrderedDict[IPAddress, None]] = OrderedDict()

    def note(self, key_id: str, ip: IPAddress) -> None:
        ips = self._by_key.get(key_id)
        if ips is None:
            ips = self._by_key[key_id] = OrderedDict()
            if len(self._by_key) > self._max_keys:
                self._by_key.popitem(last=False)
        else:
            self._by_key.move_to_end(key_id)
        ips[ip] = None
        ips.move_to_end(ip)
        if len(ips) > self._per_key:
            ips.popitem(last=False)

    def of(self, key_id: str) -> list[IPAddress]:
        """Most recent first."""
        return list(reversed(self._by_key.get(key_id, {})))
