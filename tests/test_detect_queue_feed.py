"""The one-machine transport: the gateway's sink batches into a multiprocessing queue, the
detector child reads them; a backlog is read in large batches so a late detector catches up."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import time

import pytest

from modelfence.detect.feeds import QueueFeed, QueueSink
from modelfence.telemetry.pipeline import EventPipeline, PipelineSettings

from .test_detect_streams import benign_chat

# A thread queue below: a multiprocessing queue's feeder thread puts an item into the pipe
# a moment after ``put`` returns, so what a read finds already queued would be up to chance.


async def test_a_backlog_is_merged_into_one_read_up_to_max_events() -> None:
    q: queue.Queue[object] = queue.Queue()
    sink, feed = QueueSink(q), QueueFeed(q)
    events = benign_chat("user-a", 50, seed=1)
    for start in range(0, 50, 10):
        await sink.write(events[start : start + 10])
    first = await feed.read(max_events=25, timeout=1.0)
    assert first is not None
    # whole sink batches, never split: 10 + 10 + 10 reaches 25
    assert [e.request_id for e in first] == [e.request_id for e in events[:30]]
    second = await feed.read(max_events=500, timeout=1.0)
    assert second is not None
    assert [e.request_id for e in second] == [e.request_id for e in events[30:]]
    assert await feed.read(max_events=500, timeout=0.05) == []


async def test_the_events_before_the_close_are_handed_over_before_it() -> None:
    q: queue.Queue[object] = queue.Queue()
    sink, feed = QueueSink(q), QueueFeed(q)
    events = benign_chat("user-b", 8, seed=2)
    await sink.write(events[:4])
    await sink.write(events[4:])
    q.put(None)  # what closing the detector sends
    batch = await feed.read(max_events=500, timeout=1.0)
    assert batch is not None
    assert [e.request_id for e in batch] == [e.request_id for e in events]
    assert await feed.read(max_events=500, timeout=1.0) is None


async def test_a_detector_that_is_behind_is_named_in_the_lanes_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    q = multiprocessing.get_context("spawn").Queue(1)
    pipeline = EventPipeline([QueueSink(q)], settings=PipelineSettings(
        batch_size=5, retry_min_seconds=0.01, retry_max_seconds=0.02,
    ))
    await pipeline.start()
    with caplog.at_level(logging.WARNING, logger="modelfence.telemetry"):
        for event in benign_chat("user-c", 12, seed=3):
            pipeline.emit(event)
        deadline = time.monotonic() + 5
        while not pipeline.stats["sink_error:detector"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    assert pipeline.stats["sink_error:detector"] >= 1 and pipeline.pending() > 0
    assert "sink detector failed, buffering: Full: the detector is behind" in caplog.text
    await pipeline.stop(timeout=0.1)  # the rest is counted as dropped
    q.close()
