"""Pure parsers (and formatters) for the units the config file is written in.

- Durations: `250ms`, `30s`, `5m`, `1h`, `1d`, fractions such as `1.5s`, or a bare number of
  seconds (`30`, `0.25`, `1.0e-05` as YAML dumps small floats). Units never take an
  exponent. At most 365 days, so every timer and Redis expiry stays in range.
- Rates: `N/DURATION` (`60/1m`, `50/1s`, `1000/60s`), or `N/UNIT` meaning one of that unit
  (`10/s` is `10/1s`). N is a positive integer; the window is at least 1 ms.
- Quotas: `N/PERIOD` with PERIOD exactly `1d` (UTC day), `7d` (ISO week, Monday 00:00 UTC) or
  `month` (calendar month, UTC): fixed periods, not sliding windows, so `24h` is refused.
- Sizes: a number of bytes, or a number with a unit. Units are binary and case-insensitive:
  `KB` = `KiB` = `K` = 1024 bytes, `MB` = `MiB` = `M` = 1024², `GB` = `GiB` = `G` = 1024³ (the
  way nginx reads `client_max_body_size 10m`), so the SPEC default `10MB` is 10 × 1024 × 1024.
- Host and port: `0.0.0.0:8080`, `localhost:8080`, `[::1]:8080`. Port 0 (any free port) is
  accepted.

Every parser raises `UnitError` (a `ValueError`) whose message quotes the value and fits after
"FILE:LINE: dotted.path: ".
"""

from __future__ import annotations

import ipaddress
import json
import math
import re

MAX_DURATION = 365 * 86400.0
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# A number with a unit, or bare seconds (which may be written 1.0e-05, as YAML dumps small floats).
_DURATION = re.compile(
    r"(?P<sign>-?)(?:(?P<number>\d+(?:\.\d+)?|\.\d+)(?P<unit>ms|s|m|h|d)?"
    r"|(?P<seconds>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?))"
)
_RATE = re.compile(r"(?P<count>-?\d+)/(?P<window>.+)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE = re.compile(r"(?P<sign>-?)(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)

DURATION_HINT = "e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds"
RATE_HINT = "N/DURATION, e.g. 60/1m"
QUOTA_PERIODS = ("1d", "7d", "month")
QUOTA_HINT = "N/PERIOD with PERIOD 1d, 7d or month, e.g. 250000/month"
# The largest count a limit may have: the largest integer a structured header field carries
# (RFC 8941 §3.3.1: 15 digits), so `RateLimit-Policy: "rpm";q=N` stays parseable, far past any
# plan, and exact in Lua's doubles.
MAX_COUNT = 10**15 - 1
SIZE_HINT = "e.g. 10MB, 512KB, 1GiB, or a number of bytes"


class UnitError(ValueError):
    """A value that does not parse as the unit it should be written in."""


_QUOTE_LIMIT = 80  # characters of a value shown in a message: a problem stays one readable line


def quote(value: object) -> str:
    """The value as it appears in messages: strings in double quotes, escapes visible, and a
    long value cut to its start (`"1111…" (5000 characters)`)."""
    if isinstance(value, str):
        if len(value) > _QUOTE_LIMIT:
            return json.dumps(value[:_QUOTE_LIMIT] + "…", ensure_ascii=False) + f" ({len(value)} characters)"
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# Python refuses to convert more than 4,300 digits (a ValueError, not our message) and the
# conversion costs quadratic time below that: count the digits first.
MAX_INT_DIGITS = 16  # 2**53 has 16 digits; no setting means more


def parse_int(text: str) -> int | None:
    """`[-+]digits` as an int, or None when it has more than MAX_INT_DIGITS significant digits
    (too large for any setting). The caller has checked the text is an integer."""
    digits = text.lstrip("+-").lstrip("0")  # leading zeros count toward Python's limit too
    if len(digits) > MAX_INT_DIGITS:
        return None
    return -int(digits or "0") if text.startswith("-") else int(digits or "0")


def parse_duration(value: str | int | float, *, allow_zero: bool = False) -> float:
    """Seconds as a float; negative is always refused, zero only when `allow_zero`."""
    seconds = _duration_seconds(value)
    if seconds < 0:
        raise UnitError(f"{quote(value)} must not be negative")
    if seconds == 0 and not allow_zero:
        raise UnitError(f"{quote(value)} must be greater than 0")
    if seconds > MAX_DURATION:
        raise UnitError(f"{quote(value)} is too long (at most 365d)")
    return seconds


def _duration_seconds(value: str | int | float) -> float:
    if isinstance(value, bool):
        raise UnitError(f"{quote(value)} is not a duration ({DURATION_HINT})")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise UnitError(f"{quote(value)} is not a duration ({DURATION_HINT})")
        if match["seconds"] is not None:
            seconds = float(match["seconds"])
        else:
            seconds = float(match["number"]) * _DURATION_UNITS[match["unit"] or "s"]
        if match["sign"]:
            seconds = -seconds
    if not math.isfinite(seconds):
        raise UnitError(f"{quote(value)} is too long (at most 365d)")
    return seconds


def parse_rate(value: str) -> tuple[int, float]:
    """`N/DURATION` → (N, window seconds). `N/s` means `N/1s`."""
    text = value.strip() if isinstance(value, str) else ""
    match = _RATE.fullmatch(text.replace(" ", ""))
    if match is None:
        raise UnitError(f"{quote(value)} is not a rate ({RATE_HINT})")
    count = parse_int(match["count"])
    if count is None or count > MAX_COUNT:
        raise UnitError(f"{quote(value)}: the number of requests is too large (at most {MAX_COUNT})")
    window_text = match["window"]
    if window_text in _DURATION_UNITS:
        window_text = "1" + window_text
    try:
        window = _duration_seconds(window_text)
    except UnitError:
        raise UnitError(f"{quote(value)} is not a rate ({RATE_HINT})") from None
    if count <= 0:
        raise UnitError(f"{quote(value)}: the number of requests must be greater than 0")
    if window < 0.001:
        raise UnitError(f"{quote(value)}: the window must be at least 1ms")
    if window > MAX_DURATION:
        raise UnitError(f"{quote(value)}: the window is too long (at most 365d)")
    return count, window


def parse_quota(value: str) -> tuple[int, str]:
    """`N/PERIOD` → (N, period), PERIOD one of QUOTA_PERIODS."""
    text = value.strip().replace(" ", "") if isinstance(value, str) else ""
    count_text, slash, period = text.partition("/")
    if not slash or not re.fullmatch(r"-?\d+", count_text):
        raise UnitError(f"{quote(value)} is not a quota ({QUOTA_HINT})")
    if period not in QUOTA_PERIODS:
        raise UnitError(f"{quote(value)}: the period must be exactly 1d, 7d or month (fixed UTC periods)")
    count = parse_int(count_text)
    if count is None or count > MAX_COUNT:
        raise UnitError(f"{quote(value)}: the number is too large (at most {MAX_COUNT})")
    if count <= 0:
        raise UnitError(f"{quote(value)}: the number must be greater than 0")
    return count, period


def parse_size(value: str | int, *, allow_zero: bool = False) -> int:
    """Bytes as an int (binary units, see the module docstring)."""
    if isinstance(value, bool):
        raise UnitError(f"{quote(value)} is not a size ({SIZE_HINT})")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value.strip())
        unit = match["unit"].lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise UnitError(f"{quote(value)} is not a size ({SIZE_HINT})")
        number = float(match["number"])
        if not math.isfinite(number):
            raise UnitError(f"{quote(value)} is too large")
        size = int(number * _SIZE_UNITS[unit])
        if match["sign"]:
            size = -size
    if size < 0:
        raise UnitError(f"{quote(value)} must not be negative")
    if size == 0 and not allow_zero:
        raise UnitError(f"{quote(value)} must be greater than 0")
    if size > 2**53:
        raise UnitError(f"{quote(value)} is too large")
    return size


def parse_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` → (host, port); an IPv6 host comes back without its brackets."""
    text = value.strip()
    hint = f"{quote(value)} is not HOST:PORT (e.g. 0.0.0.0:8080 or [::1]:8080)"
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UnitError(hint)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UnitError(f"{quote(value)}: {quote(host)} is not an IPv6 address") from None
    elif ":" in host:
        raise UnitError(f"{quote(value)}: an IPv6 address needs brackets, e.g. [::1]:8080")
    elif not _is_host(host):
        raise UnitError(f"{quote(value)}: {quote(host)} is not a host name or IPv4 address")
    port = parse_int(port_text) if port_text.isascii() and port_text.isdigit() else None
    if port is None or port > 65535:
        raise UnitError(f"{quote(value)}: the port must be a number from 0 to 65535")
    return host, port


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header (or an `admin_hosts` entry) → (lower-case name without brackets, port or None);
    None when it is not `name`, `name:port`, `[v6]` or `[v6]:port`."""
    text = value.strip().lower()
    port_text: str | None
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        if not rest:
            return name, None
        if not rest.startswith(":"):
            return None
        port_text = rest[1:]
    elif text.count(":") == 1:
        name, port_text = text.split(":")
    elif ":" in text:
        return None  # an IPv6 address without brackets is not a Host
    else:
        name, port_text = text, None
    if not text.startswith("[") and not _is_host(name):
        return None
    if port_text is None:
        return name.rstrip("."), None
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and int(port_text) <= 65535):
        return None
    return name.rstrip("."), int(port_text)


def _is_host(host: str) -> bool:
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return host.isascii() and _HOSTNAME.fullmatch(host) is not None


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 60 → `1m`, 0.25 → `250ms`, 90 → `90s`, 1.5 → `1.5s`."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    millis = seconds * 1000
    if seconds < 1 and abs(millis - round(millis)) < 1e-9:
        return f"{round(millis)}ms"
    return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"


def format_rate(limit: int, window: float) -> str:
    return f"{limit}/{format_duration(window)}"


def format_size(size: int) -> str:
    """Bytes in the largest binary unit that divides them exactly: 10485760 → `10MiB`."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
