"""The one-machine transport: the gateway's sink batches into a multiprocessing queue, the
detector child reads them; a backlog is read in large batches so a late detector catches up."""

from __future__ import annotations

import multiprocessing
import queue
import time

from modelfence.detect.feeds import QueueFeed, QueueSink

from .test_detect_streams import benign_chat


def _settled(q: queue.Queue[object] | object, count: int) -> None:
    """A multiprocessing queue's feeder thread puts items a moment after ``put``."""
    deadline = time.monotonic() + 5
    while q.qsize() < count and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)


async def test_a_backlog_is_merged_into_one_read_up_to_max_events() -> None:
    q = multiprocessing.get_context("spawn").Queue()
    sink, feed = QueueSink(q), QueueFeed(q)
    events = benign_chat("user-a", 50, seed=1)
    for start in range(0, 50, 10):
        await sink.write(events[start : start + 10])
    _settled(q, 5)
    first = await feed.read(max_events=25, timeout=1.0)
    assert first is not None
    # whole sink batches, never split: 10 + 10 + 10 reaches 25
    assert [e.request_id for e in first] == [e.request_id for e in events[:30]]
    second = await feed.read(max_events=500, timeout=1.0)
    assert second is not None
    assert [e.request_id for e in second] == [e.request_id for e in events[30:]]
    assert await feed.read(max_events=500, timeout=0.05) == []
    q.close()


async def test_the_events_before_the_close_are_handed_over_before_it() -> None:
    q = multiprocessing.get_context("spawn").Queue()
    sink, feed = QueueSink(q), QueueFeed(q)
    events = benign_chat("user-b", 8, seed=2)
    await sink.write(events[:4])
    await sink.write(events[4:])
    q.put(None)  # what closing the detector sends
    _settled(q, 3)
    batch = await feed.read(max_events=500, timeout=1.0)
    assert batch is not None
    assert [e.request_id for e in batch] == [e.request_id for e in events]
    assert await feed.read(max_events=500, timeout=1.0) is None
    q.close()
