"""Which requests the admin API answers, by their `Host`: a pure rule, no I/O. (Where the
admin port may listen at all is a config rule: `gateway.config.admin_access`.)

DNS rebinding lets a web page in the operator's browser send requests to `127.0.0.1:9464`
under the page's own name (`Host: evil.example`). So the admin API answers only a `Host` that
names this port: a loopback name or address, any IP address (a rebinding attack always carries
the attacker's domain name, never an IP literal, so Prometheus' `IP:port` scrapes keep
working), the host of `admin_listen`, or an `admin_hosts` entry. A port in the `Host` must be
the port the connection arrived on, unless an `admin_hosts` entry names it (`localhost:19464`
behind a port mapping).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from gateway.config.admin_access import is_loopback
from gateway.config.units import UnitError, parse_host_port, split_host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str | None, port: int | None, listen_host: str, extra: Iterable[str]) -> bool:
    """Whether a request whose `Host` is `host_header`, arriving on local `port`, may use the admin API.

    `listen_host` is the host of `admin_listen`; `extra` the `admin_hosts` entries.
    """
    if host_header is None:
        return False  # HTTP/1.1 requires Host; a client without one is not a browser we can trust
    parsed = split_host(host_header)
    if parsed is None:
        return False
    name, given_port = parsed
    for entry in extra:
        allowed = split_host(entry)
        if allowed is not None and allowed[0] == name and allowed[1] is not None and allowed[1] == given_port:
            return True
    if given_port is not None and given_port != port:
        return False
    if is_loopback(name) or _is_ip(name) or name == listen_host.strip("[]").lower().rstrip("."):
        return True
    return any((allowed := split_host(entry)) is not None and allowed == (name, None) for entry in extra)


def listen_host(address: str) -> str:
    try:
        return parse_host_port(address)[0]
    except UnitError:
        return ""
