"""The garbage collector in a long-running ModelFence process.

A gateway or detector imports numpy, SQLAlchemy, pydantic and the rest: about 150,000
tracked objects once the gateway's modules are imported, more once it runs, all living as
long as the process. CPython's full collection (generation 2) walks every one of them and
stopped the event loop for about 130 ms each time, hundreds of requests' worth of the
gateway's own work (``python bench/stack_cpu.py --gc``, docs/BENCHMARKS.md).
:func:`freeze_startup` moves what start-up built into the permanent generation, which
collections skip; what requests allocate is collected as before. Objects frozen are never
freed by the collector even if they become unreachable, so this runs once, after start-up,
in processes that serve until they exit (never in tests that build many apps).

:class:`PauseWatch` reports each collection's pause, so that operators see what the
collector costs (``modelfence_gc_pause_seconds``)::

    frozen = freeze_startup()
    watch = PauseWatch(metrics.gc_pause)
    watch.start()
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any


def freeze_startup() -> int:
    """Collect, then freeze every object left: returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class PauseWatch:
    """Calls ``observe(generation, seconds)`` after each collection (a ``gc`` callback)."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._observe(info["generation"], time.perf_counter() - self._started)

    def start(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
