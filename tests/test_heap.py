"""The garbage collector in a serving process: start-up's objects frozen, pauses counted.

Without the freeze, a full collection under load walked the ~200,000 objects of start-up and
stopped the gateway's loop for about 130 ms (``bench/stack_cpu.py --gc``).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from modelfence.heap import PauseWatch, freeze_startup
from modelfence.testing.processes import http_json

from .conftest import GatewayFactory
from .services import metric_sum, scrape_metrics

GATEWAY_DETECTION = False  # conftest.module_config: no detector child


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Whatever a test freezes goes back to the collector afterwards."""
    yield
    gc.unfreeze()


def test_a_pause_watch_reports_each_collection_by_generation() -> None:
    seen: list[tuple[int, float]] = []
    watch = PauseWatch(lambda generation, seconds: seen.append((generation, seconds)))
    watch.start()
    watch.start()  # once only
    try:
        gc.collect(1)
    finally:
        watch.stop()
    # Another thread may have collected meanwhile: only the collection asked for is sure.
    assert [s for g, s in seen if g == 1] and all(0 <= s < 10 for _, s in seen)
    reported = len(seen)
    gc.collect(0)
    assert len(seen) == reported, "a stopped watch reports nothing"


def test_frozen_objects_are_out_of_reach_and_new_ones_are_collected(unfrozen: None) -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    old = Node()
    old_ref = weakref.ref(old)
    frozen = freeze_startup()
    # The modules, classes and config loaded. Another thread of the test process may free
    # a few frozen objects right after the freeze (no thread can add any): a count taken a
    # moment later is at most the one returned.
    assert frozen - 100 <= gc.get_freeze_count() <= frozen and frozen > 1000
    new = Node()
    new_ref = weakref.ref(new)
    del old, new
    gc.collect()
    assert new_ref() is None, "objects made after the freeze are collected as before"
    assert old_ref() is not None, "a full collection no longer walks what was frozen"
    gc.unfreeze()
    gc.collect()
    assert old_ref() is None


def test_a_served_gateway_freezes_its_start_up_and_counts_collector_pauses(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway()
    key = gateway.create_key("heap")
    for _ in range(100):
        status, _body = http_json(
            "POST", gateway.url + "/v1/chat/completions",
            {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}, token=key,
        )
        assert status == 200
    samples = scrape_metrics(gateway.url)
    assert metric_sum(samples, "modelfence_gc_frozen_objects") > 50_000
    pauses = metric_sum(samples, "modelfence_gc_pause_seconds_count", generation="0")
    assert pauses >= 1, "a hundred requests allocate past the first generation's threshold"
