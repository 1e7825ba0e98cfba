"""The "now from ARGV, else Redis TIME" rule is written once (gateway/store/lua/now.lua) and
assembled into every script that needs it at load time (gateway/store/scripts.py)."""

from __future__ import annotations

from importlib import resources

import pytest

from gateway.store import scripts

LUA = resources.files("gateway.store").joinpath("lua")
NAMES = sorted(entry.name.removesuffix(".lua") for entry in LUA.iterdir() if entry.name.endswith(".lua"))


def test_only_the_preamble_reads_the_redis_clock() -> None:
    readers = [name for name in NAMES if "redis.call('TIME')" in LUA.joinpath(f"{name}.lua").read_text()]
    assert readers == ["now"]


@pytest.mark.parametrize("name", [name for name in NAMES if name != "now"])
def test_assembled_scripts_read_now_from_their_own_argv(name: str) -> None:
    text = LUA.joinpath(f"{name}.lua").read_text()
    assembled = scripts.load(name).source.decode()
    assert "--#now" not in assembled
    if "--#now " in text:
        argument = text.split("--#now ", 1)[1].split("\n", 1)[0]
        assert f"if {argument} ~= '' then\n  now = tonumber({argument})" in assembled
        assert assembled.count("redis.call('TIME')") == 1
    else:
        assert "redis.call('TIME')" not in assembled


def test_a_directive_becomes_the_preamble_with_its_argument() -> None:
    assembled = scripts.assemble(b"local a = 1\n--#now ARGV[7]\nreturn now\n").decode()
    assert assembled.startswith("local a = 1\nlocal now\nif ARGV[7] ~= '' then\n  now = tonumber(ARGV[7])")
    assert assembled.endswith("end\nreturn now\n")
