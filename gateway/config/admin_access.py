"""Whether the admin port may listen where the config says: a rule of the config, checked by the
loader (so `check-config` and `serve` agree) and again on reload, against the running address.

The admin API lifts bans, frees job slots and shows every key's usage, so it must not listen
beyond this machine without `admin_token`, unless `admin_open: true` says a firewall guards it.
"""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1 (brackets allowed)."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def admin_exposure_problem(admin_listen: str, admin_host: str, admin_token: str | None, admin_open: bool) -> str | None:
    """Why the admin port must not listen on `admin_listen` (host `admin_host`) as configured, or None."""
    if is_loopback(admin_host) or admin_token or admin_open:
        return None
    return (
        f"{admin_listen} is reachable beyond this machine and admin_token is not set: set admin_token, "
        "listen on 127.0.0.1, or set admin_open: true if a firewall guards the port"
    )
