"""Unit parsers and formatters of the config file: durations, rates, sizes, host:port."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.units import (
    MAX_DURATION,
    UnitError,
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_host_port,
    parse_rate,
    parse_size,
)

# -- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("30", 30.0),
        ("0.25", 0.25),
        (" 2h ", 7200.0),
        (45, 45.0),
        (2.5, 2.5),
        ("365d", MAX_DURATION),
        ("1.0e-05", 0.00001),  # how YAML writes small floats
        ("1e3", 1000.0),
    ],
)
def test_durations(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5x", '"5x" is not a duration (e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds)'),
        ("5 m", '"5 m" is not a duration (e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds)'),
        ("1h30m", '"1h30m" is not a duration (e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds)'),
        ("", '"" is not a duration (e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds)'),
        ("1e3s", '"1e3s" is not a duration (e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds)'),
        ("5M", '"5M" is not a duration (e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds)'),
        ("-5s", '"-5s" must not be negative'),
        (-1, "-1 must not be negative"),
        ("0", '"0" must be greater than 0'),
        ("0ms", '"0ms" must be greater than 0'),
        ("366d", '"366d" is too long (at most 365d)'),
        ("9" * 400, f'"{"9" * 80}…" (400 characters) is too long (at most 365d)'),  # cut to one short line
        (float("inf"), "inf is too long (at most 365d)"),
        (True, "True is not a duration (e.g. 250ms, 30s, 5m, 1h, 1d, or a number of seconds)"),
    ],
)
def test_bad_durations(text: str | int | float, message: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


def test_zero_duration_only_where_allowed() -> None:
    assert parse_duration("0s", allow_zero=True) == 0.0
    assert parse_duration(0, allow_zero=True) == 0.0
    with pytest.raises(UnitError, match="must not be negative"):
        parse_duration("-1s", allow_zero=True)


def test_unit_error_is_a_value_error() -> None:
    assert issubclass(UnitError, ValueError)


# -- rates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("60/1m", (60, 60.0)),
        ("50/1s", (50, 1.0)),
        ("1000/60s", (1000, 60.0)),
        ("10/s", (10, 1.0)),
        ("10/m", (10, 60.0)),
        ("100/h", (100, 3600.0)),
        ("5/250ms", (5, 0.25)),
        ("1/1ms", (1, 0.001)),
        ("3/30", (3, 30.0)),
        (" 60 / 1m ", (60, 60.0)),
    ],
)
def test_rates(text: str, rate: tuple[int, float]) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("60/1x", '"60/1x" is not a rate (N/DURATION, e.g. 60/1m)'),
        ("60", '"60" is not a rate (N/DURATION, e.g. 60/1m)'),
        ("1.5/1s", '"1.5/1s" is not a rate (N/DURATION, e.g. 60/1m)'),
        ("ten/1m", '"ten/1m" is not a rate (N/DURATION, e.g. 60/1m)'),
        ("60/", '"60/" is not a rate (N/DURATION, e.g. 60/1m)'),
        ("60/1m/1s", '"60/1m/1s" is not a rate (N/DURATION, e.g. 60/1m)'),
        ("0/1m", '"0/1m": the number of requests must be greater than 0'),
        ("-5/1m", '"-5/1m": the number of requests must be greater than 0'),
        ("5/0s", '"5/0s": the window must be at least 1ms'),
        ("5/0.5ms", '"5/0.5ms": the window must be at least 1ms'),
        ("5/400d", '"5/400d": the window is too long (at most 365d)'),
    ],
)
def test_bad_rates(text: str, message: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_rate(text)
    assert str(caught.value) == message


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MB", 10 * 1024 * 1024),
        ("512KB", 512 * 1024),
        ("1GB", 1024**3),
        ("1MiB", 1024 * 1024),
        ("1mib", 1024 * 1024),
        ("10m", 10 * 1024 * 1024),
        ("64k", 64 * 1024),
        ("1.5KB", 1536),
        ("100B", 100),
        ("100", 100),
        ("2 MB", 2 * 1024 * 1024),
        (4096, 4096),
    ],
)
def test_sizes_are_binary(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10 megs", '"10 megs" is not a size (e.g. 10MB, 512KB, 1GiB, or a number of bytes)'),
        ("MB", '"MB" is not a size (e.g. 10MB, 512KB, 1GiB, or a number of bytes)'),
        ("10TB", '"10TB" is not a size (e.g. 10MB, 512KB, 1GiB, or a number of bytes)'),
        ("0", '"0" must be greater than 0'),
        ("-1KB", '"-1KB" must not be negative'),
        (0, "0 must be greater than 0"),
        ("99999999999GB", '"99999999999GB" is too large'),
    ],
)
def test_bad_sizes(text: str | int, message: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_size(text)
    assert str(caught.value) == message


def test_zero_size_only_where_allowed() -> None:
    assert parse_size("0", allow_zero=True) == 0


# -- host:port -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:80", ("::", 80)),
        ("localhost:8080", ("localhost", 8080)),
        ("gateway.internal.example:443", ("gateway.internal.example", 443)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_host_port(text: str, address: tuple[str, int]) -> None:
    assert parse_host_port(text) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8080", '"8080" is not HOST:PORT (e.g. 0.0.0.0:8080 or [::1]:8080)'),
        (":8080", '":8080" is not HOST:PORT (e.g. 0.0.0.0:8080 or [::1]:8080)'),
        ("::1:8080", '"::1:8080": an IPv6 address needs brackets, e.g. [::1]:8080'),
        ("[::g]:8080", '"[::g]:8080": "::g" is not an IPv6 address'),
        ("256.0.0.1:80", '"256.0.0.1:80": "256.0.0.1" is not a host name or IPv4 address'),
        ("bad_host:80", '"bad_host:80": "bad_host" is not a host name or IPv4 address'),
        ("127.0.0.1:65536", '"127.0.0.1:65536": the port must be a number from 0 to 65535'),
        ("127.0.0.1:http", '"127.0.0.1:http": the port must be a number from 0 to 65535'),
        ("127.0.0.1:", '"127.0.0.1:": the port must be a number from 0 to 65535'),
        ("127.0.0.1:٣", '"127.0.0.1:٣": the port must be a number from 0 to 65535'),
    ],
)
def test_bad_host_port(text: str, message: str) -> None:
    with pytest.raises(UnitError) as caught:
        parse_host_port(text)
    assert str(caught.value) == message


# -- formatting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (60, "1m"),
        (90, "90s"),
        (7200, "2h"),
        (86400, "1d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_rate_and_size() -> None:
    assert format_rate(60, 60.0) == "60/1m"
    assert format_rate(50, 1.0) == "50/1s"
    assert format_size(10 * 1024 * 1024) == "10MiB"
    assert format_size(1536) == "1536B"
    assert format_size(2048) == "2KiB"


@given(st.integers(min_value=1, max_value=int(MAX_DURATION * 1000)))
def test_formatted_durations_parse_back(millis: int) -> None:
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@given(st.integers(min_value=1, max_value=10**6), st.integers(min_value=1, max_value=86400 * 1000))
def test_formatted_rates_parse_back(limit: int, window_ms: int) -> None:
    window = window_ms / 1000
    parsed_limit, parsed_window = parse_rate(format_rate(limit, window))
    assert parsed_limit == limit and parsed_window == pytest.approx(window)


@given(st.integers(min_value=1, max_value=2**40))
def test_formatted_sizes_parse_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.text(max_size=20))
def test_parsers_raise_only_unit_errors(text: str) -> None:
    for parse in (parse_duration, parse_rate, parse_size, parse_host_port):
        try:
            parse(text)
        except UnitError:
            pass
