"""Garbage-collector settings for a long-running worker.

CPython collects its youngest generation whenever tracked container allocations outrun
deallocations by 700. Under load dozens of requests are in flight, their live objects cross
700 every few requests, and each collection walks them all; every tenth also walks the middle
generation, and now and then a full collection walks the whole heap (config, routes, metrics
registry, imported modules). Measured on a saturated worker (docs/benchmarks.md): about a
tenth of its CPU and, for the full collections, pauses of about 30 ms.

So a worker, once started:
- freezes what startup built (`gc.freeze`): it lives as long as the worker, and full
  collections stop walking it; refcounting still frees any of it that is dropped;
- collects the youngest generation only after YOUNG_THRESHOLD net allocations. Steady
  request traffic allocates and frees about evenly, so collections become rare; cyclic
  garbage still gets collected, only in larger batches. The worst case measured: a failing
  upstream (every `except ... as exc: raise ... from exc` in aiohttp leaves a reference cycle
  holding the request) under 60 KB uploads at saturation peaked at 105 MB RSS, against 87 MB
  with CPython's default threshold.

A config reload builds new long-lived objects and drops old ones: `refreeze` thaws, collects
(old objects caught in reference cycles) and freezes again.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call once startup is done (store connected, app built), before serving."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)


def refreeze() -> None:
    """After a config reload: let what the old config held in cycles be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
