"""`max_request_line` and `max_request_headers` have a ceiling (probe-config finding 5): the
request parser's work on a head grows faster than its size (gateway/head_limits.py), and with
4GB allowed one client streaming a 150 MB header stalled every other client for seconds.
"""

from __future__ import annotations

import pytest

from gateway.config.loader import ConfigError, load_config_text
from tests.support.config_texts import minimal_config

BASE = minimal_config(routes="  - path: /v1/**\n")
LINE = BASE.count("\n") + 1  # the line a field appended to BASE is on


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "t.yaml")
    return caught.value.problems


@pytest.mark.parametrize("field", ["max_request_line", "max_request_headers"])
def test_a_head_limit_of_1mib_is_accepted(field: str) -> None:
    assert getattr(load_config_text(BASE + f"{field}: 1MiB\n", "t.yaml"), field) == 1024 * 1024


@pytest.mark.parametrize("value", ["1048577", "1025KiB", "4GB", "9007199254740992"])
@pytest.mark.parametrize("field", ["max_request_line", "max_request_headers"])
def test_a_head_limit_over_1mib_is_refused_where_it_is_written(field: str, value: str) -> None:
    assert problems_of(BASE + f"{field}: {value}\n") == [
        f't.yaml:{LINE}: {field}: "{value}" is too large (at most 1MiB)'
    ]
