"""The worker's GC settings: startup objects frozen, rare young collections, reload refreezes."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.admission.identity import hash_key
from gateway.config.loader import load_config
from gateway.gc_tuning import YOUNG_THRESHOLD, refreeze, settle_heap
from gateway.reload import reload_config
from gateway.server import ServeOptions, Worker, bind
from gateway.state import GatewayState
from tests.support.processes import write_config


@pytest.fixture(autouse=True)
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def test_settle_heap_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    middle, oldest = gc.get_threshold()[1:]
    long_lived = [Node() for _ in range(100)]
    settle_heap()
    assert gc.get_freeze_count() >= len(long_lived)
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, oldest)


def test_a_frozen_cycle_outlives_collections_until_refreeze() -> None:
    # what a reload drops: old config objects caught in a reference cycle
    held = cycle()
    ref = weakref.ref(held)
    settle_heap()
    del held
    gc.collect()
    assert ref() is not None, "frozen objects are out of the collector's reach"
    refreeze()
    assert ref() is None
    assert gc.get_freeze_count() > 0


def test_cycles_made_after_startup_are_still_collected() -> None:
    settle_heap()
    ref = weakref.ref(cycle())
    gc.collect()
    assert ref() is None


# -- wiring: the worker settles its heap once started; a reload refreezes -------------------

def write_minimal_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "gateway.yaml", {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "upstream": {"url": "http://127.0.0.1:9"},
        "keys": [{"id": "k", "sha256": hash_key("gc-tuning-key"), "plan": "p"}],
        "plans": {"p": {"limits": {"rpm": {"rate": "10/1m"}}}},
        "routes": [{"path": "/**", "limits": ["rpm"]}],
    })


def test_a_worker_settles_its_heap_after_startup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_minimal_config(tmp_path)
    worker = Worker(load_config(str(path), {}), ServeOptions(str(path), {}))
    settled: list[bool] = []
    opened: list[bool] = []
    open_state = GatewayState.open

    async def record_open(state: GatewayState) -> None:
        await open_state(state)
        opened.append(True)

    def record_settle() -> None:
        # after the store (startup's last step) opened, before either server serves
        settled.append(opened == [True] and not worker.public.started)
        worker.stop()  # serve nothing: startup is what is under test

    monkeypatch.setattr(GatewayState, "open", record_open)
    monkeypatch.setattr("gateway.server.settle_heap", record_settle)
    public, admin = bind("127.0.0.1:0"), bind("127.0.0.1:0")
    try:
        asyncio.run(asyncio.wait_for(worker.run(public, admin), 30))
    finally:
        public.close()
        admin.close()
    assert settled == [True]


def test_a_config_reload_refreezes(tmp_path: Path) -> None:
    path = write_minimal_config(tmp_path)
    state = GatewayState.create(load_config(str(path), {}))
    held = cycle()
    ref = weakref.ref(held)
    settle_heap()
    del held
    gc.collect()
    assert ref() is not None
    assert reload_config(state, str(path), {})
    assert ref() is None
