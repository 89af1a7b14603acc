"""The event pipeline: a bounded queue in front, one retrying lane per sink behind it.

The gateway calls :meth:`EventPipeline.emit` once per request. It is a ``put_nowait`` on a
bounded :class:`asyncio.Queue`, so a request never waits for telemetry; when the queue is
full the event is dropped and counted (``dropped_queue_full``). A background task moves
events from the queue into one :class:`_Lane` per sink. A lane writes in batches; when its
sink fails, the batch stays and is retried with exponential back-off while new events
buffer behind it, up to ``buffer_events``; past that new ones are dropped, counted
(``dropped_sink``) and reported to ``on_dropped`` (which logs and alerts). Every event is
thus written, or counted under exactly one dropped fate::

    pipeline = EventPipeline([SqlSink(engine)], settings=PipelineSettings())
    await pipeline.start()
    pipeline.emit(event)            # or a zero-argument callable that builds the event
    await pipeline.stop()           # flushes what it can, counts the rest
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from modelfence.telemetry.events import RequestEvent

log = logging.getLogger("modelfence.telemetry")

# Building the event is deferred to the pipeline task: the request only pays for a closure.
EventSource = RequestEvent | Callable[[], RequestEvent]


class Sink(Protocol):
    """Where batches of events go. ``write`` raises on failure; the lane retries it."""

    name: str

    async def write(self, events: Sequence[RequestEvent]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    queue_size: int = 10_000
    batch_size: int = 500
    buffer_events: int = 100_000
    retry_min_seconds: float = 0.1
    retry_max_seconds: float = 30.0

    def __post_init__(self) -> None:
        if min(self.queue_size, self.batch_size, self.buffer_events) < 1:
            raise ValueError("queue_size, batch_size and buffer_events must be >= 1")
        if not 0 < self.retry_min_seconds <= self.retry_max_seconds:
            raise ValueError("need 0 < retry_min_seconds <= retry_max_seconds")


Counts = Callable[[str, int], None]  # (fate, n): emitted | written | dropped_* | sink_error


class _Lane:
    """One sink's buffer and writer task."""

    def __init__(
        self, sink: Sink, settings: PipelineSettings, count: Counts, on_dropped: Counts
    ) -> None:
        self.sink = sink
        self.settings = settings
        self.count = count
        self.on_dropped = on_dropped
        self.buffer: deque[RequestEvent] = deque()
        self.wakeup = asyncio.Event()
        self.failing = False

    def put(self, events: list[RequestEvent]) -> None:
        # When full, the newest are refused: the oldest may be the batch being written.
        room = self.settings.buffer_events - len(self.buffer)
        self.buffer.extend(events[: max(room, 0)])
        overflow = len(events) - max(room, 0)
        if overflow > 0:
            self.count("dropped_sink", overflow)
            self.on_dropped(self.sink.name, overflow)
        self.wakeup.set()

    async def run(self) -> None:
        delay = self.settings.retry_min_seconds
        while True:
            if not self.buffer:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = [self.buffer[i] for i in range(min(len(self.buffer), self.settings.batch_size))]
            try:
                await self.sink.write(batch)
            except Exception as exc:  # noqa: BLE001 - any sink failure: keep the batch, retry
                self.count(f"sink_error:{self.sink.name}", 1)
                if not self.failing:
                    log.warning("telemetry sink %s failed, buffering: %s", self.sink.name, exc)
                self.failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_seconds)
                continue
            if self.failing:
                log.info("telemetry sink %s recovered", self.sink.name)
                self.failing = False
            delay = self.settings.retry_min_seconds
            for _ in range(len(batch)):
                self.buffer.popleft()
            self.count(f"written:{self.sink.name}", len(batch))


class EventPipeline:
    """Bounded, never-blocking event delivery to several sinks (see module docstring)."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        *,
        settings: PipelineSettings | None = None,
        count: Counts | None = None,
        on_dropped: Counts | None = None,
    ) -> None:
        self.settings = settings or PipelineSettings()
        self.stats: Counter[str] = Counter()
        self._extra_count = count
        self._on_dropped = on_dropped or _log_dropped
        self._queue: asyncio.Queue[EventSource] = asyncio.Queue(self.settings.queue_size)
        self._lanes = [_Lane(s, self.settings, self._count, self._on_dropped) for s in sinks]
        self._tasks: list[asyncio.Task[None]] = []

    def _count(self, fate: str, n: int) -> None:
        self.stats[fate] += n
        if self._extra_count is not None:
            self._extra_count(fate, n)

    def emit(self, event: EventSource) -> bool:
        """Hand one event over without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._count("dropped_queue_full", 1)
            return False
        self._count("emitted", 1)
        return True

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._drain(), name="telemetry-drain")]
        self._tasks += [
            asyncio.create_task(lane.run(), name=f"telemetry-{lane.sink.name}")
            for lane in self._lanes
        ]

    async def _drain(self) -> None:
        while True:
            items = [await self._queue.get()]
            # Collect what else is waiting, then give writers a full batch at a time.
            while len(items) < self.settings.batch_size:
                try:
                    items.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            events = [self._materialise(item) for item in items]
            ready = [e for e in events if e is not None]
            for lane in self._lanes:
                lane.put(ready)

    def _materialise(self, item: EventSource) -> RequestEvent | None:
        if isinstance(item, RequestEvent):
            return item
        try:
            return item()
        except Exception:  # a bug in an event builder must not stop the pipeline
            log.exception("building a telemetry event failed")
            self._count("dropped_build_error", 1)
            return None

    def pending(self) -> int:
        """Events not yet written by every sink (queued or buffered)."""
        return self._queue.qsize() + max((len(lane.buffer) for lane in self._lanes), default=0)

    async def flush(self, timeout: float) -> bool:
        """Wait until everything emitted so far is written; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return not self.pending()

    async def stop(self, timeout: float = 5.0) -> None:
        """Flush for up to ``timeout`` seconds; whatever is left is counted as dropped."""
        await self.flush(timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        left = self._queue.qsize()
        for lane in self._lanes:
            lost = left + len(lane.buffer)
            if lost:
                self._count("dropped_shutdown", lost)
                self._on_dropped(lane.sink.name, lost)
            await lane.sink.close()


def _log_dropped(sink: str, n: int) -> None:
    log.error("telemetry: %d events for sink %s were dropped", n, sink)
