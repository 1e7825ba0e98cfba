"""The config file watcher reads a file only once it has stopped changing.

Found by probing: a file rewritten in place (`cat new > gw.yaml`, scp, a slow copy) was read
between its writes, as a shorter file that was valid YAML: the keys in its second half were gone
for a poll or more, and their clients got 401 `invalid_api_key` (ban strikes) meanwhile.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.reload import watch_file

pytestmark = pytest.mark.anyio

INTERVAL, SETTLE = 0.02, 0.5
FULL = b"keys:\n  - alice\n  - bob\n"


class ReadingReloader:
    """Stands for `Reloader`: records what the file held at each reload."""

    def __init__(self, path: Path, on_reload: bytes | None = None) -> None:
        self.path = str(path)
        self.read: list[bytes] = []
        self._on_reload = on_reload  # written to the file during the first load

    async def reload(self) -> bool:
        self.read.append(Path(self.path).read_bytes())
        if self._on_reload is not None:
            Path(self.path).write_bytes(self._on_reload)
            self._on_reload = None
        return True


async def _watching(reloader: ReadingReloader, scenario) -> None:  # type: ignore[no-untyped-def]
    watcher = asyncio.ensure_future(watch_file(reloader, interval=INTERVAL, settle=SETTLE))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(3 * INTERVAL)  # the watcher has seen the file as it was
        await scenario()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_a_file_rewritten_in_place_is_read_only_once_whole(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(b"keys:\n  - alice\n")
    reloader = ReadingReloader(path)

    async def rewrite_in_two_writes() -> None:
        with path.open("wb") as file:  # truncated: an empty file first
            file.write(FULL[:16])
            file.flush()
            await asyncio.sleep(5 * INTERVAL)  # polls see the half-written file
            file.write(FULL[16:])
        await asyncio.sleep(SETTLE + 10 * INTERVAL)

    await _watching(reloader, rewrite_in_two_writes)
    assert reloader.read == [FULL]


async def test_a_change_is_read_once_after_it_settles(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(b"keys: []\n")
    reloader = ReadingReloader(path)

    async def one_save() -> None:
        path.write_bytes(FULL)
        await asyncio.sleep(SETTLE / 2)
        assert reloader.read == []  # not yet: it may still be being written
        await asyncio.sleep(SETTLE + 10 * INTERVAL)

    await _watching(reloader, one_save)
    assert reloader.read == [FULL]


async def test_a_file_written_to_during_its_load_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(b"keys: []\n")
    later = FULL + b"  - carol\n"
    reloader = ReadingReloader(path, on_reload=later)

    async def save() -> None:
        path.write_bytes(FULL)
        await asyncio.sleep(2 * SETTLE + 20 * INTERVAL)

    await _watching(reloader, save)
    assert reloader.read == [FULL, later]
