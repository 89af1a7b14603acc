"""The event pipeline: a bounded queue in front, one retrying lane per sink behind it.

The gateway calls :meth:`EventPipeline.emit` once per request. It is a ``put_nowait`` on a
bounded :class:`asyncio.Queue`, so a request never waits for telemetry; when the queue holds
``queue_size`` events or ``queue_bytes`` bytes the event is dropped, counted
(``dropped_queue_full``, ``dropped_queue_bytes``) and logged. The gateway emits a
:class:`PendingEvent` (a slim snapshot of the request), which a worker thread turns into
the event, so hashing and parsing run neither on the request path nor on the event loop.
A background task moves events from the queue into one :class:`_Lane` per sink. A lane
writes in batches; when its sink fails, the batch stays and is retried with exponential
back-off while new events buffer behind it, up to ``buffer_events`` events and
``buffer_bytes`` bytes; past that new ones are dropped, counted (``dropped_sink``) and
reported to ``on_dropped`` (which logs and alerts). A sink that
refuses a batch for its values (:class:`RejectedBatch`) would fail the same way forever, so
the lane splits that batch until the events at fault are alone, writes the others, and
counts and logs each refused one (``rejected``). Every event is thus written, or counted
under exactly one dropped fate::

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
from typing import TYPE_CHECKING, Protocol

from modelfence.telemetry.events import RequestEvent, approx_bytes
from modelfence.throttled_log import ThrottledLog

if TYPE_CHECKING:
    from modelfence.config import TelemetryConfig

log = logging.getLogger("modelfence.telemetry")

CALLABLE_BYTES = 4096  # what a plain builder callable is assumed to hold
BUILD_LINGER_SECONDS = 0.05  # events wait at most this long to be built together
DROP_LOG_SECONDS = 10.0  # queue drops are logged at most this often (with the count since)


class PendingEvent(Protocol):
    """What a finished request leaves behind: called (in a worker thread) it builds the
    event. ``nbytes`` is roughly the memory it holds, for the queue's byte bound."""

    nbytes: int

    def __call__(self) -> RequestEvent: ...


EventSource = RequestEvent | PendingEvent | Callable[[], RequestEvent]


def size_of(item: EventSource) -> int:
    if isinstance(item, RequestEvent):
        return approx_bytes(item)
    nbytes = getattr(item, "nbytes", CALLABLE_BYTES)
    return nbytes if isinstance(nbytes, int) else CALLABLE_BYTES


class RejectedBatch(Exception):
    """Raised by a sink whose write failed because of some event's values (a number no
    column holds, say): the same batch would fail again, so the lane isolates the culprits
    instead of retrying it."""


class Sink(Protocol):
    """Where batches of events go. ``write`` raises on failure; the lane retries it, or
    splits it when the error is :class:`RejectedBatch`."""

    name: str

    async def write(self, events: Sequence[RequestEvent]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    queue_size: int = 10_000
    queue_bytes: int = 64 * 2**20
    batch_size: int = 500
    buffer_events: int = 100_000
    buffer_bytes: int = 256 * 2**20
    retry_min_seconds: float = 0.1
    retry_max_seconds: float = 30.0

    @classmethod
    def of(cls, telemetry: TelemetryConfig) -> PipelineSettings:
        """The settings ``telemetry`` gives a pipeline (the gateway's and a detector's)."""
        return cls(
            queue_size=telemetry.queue_size,
            queue_bytes=telemetry.queue_bytes,
            batch_size=telemetry.batch_size,
            buffer_events=telemetry.buffer_events,
            buffer_bytes=telemetry.buffer_bytes,
            retry_max_seconds=telemetry.retry_max_seconds,
        )

    def __post_init__(self) -> None:
        sizes = (self.queue_size, self.queue_bytes, self.batch_size, self.buffer_events,
                 self.buffer_bytes)
        if min(sizes) < 1:
            raise ValueError("queue and buffer sizes and batch_size must be >= 1")
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
        self.sizes: deque[int] = deque()  # approx_bytes of each buffered event
        self.bytes = 0
        self.wakeup = asyncio.Event()
        self.failing = False

    def put(self, events: list[RequestEvent], sizes: list[int]) -> None:
        # When full, the newest are refused: the oldest may be the batch being written.
        overflow = 0
        for event, size in zip(events, sizes, strict=True):
            if (
                len(self.buffer) >= self.settings.buffer_events
                or self.bytes + size > self.settings.buffer_bytes
            ):
                overflow += 1
                continue
            self.buffer.append(event)
            self.sizes.append(size)
            self.bytes += size
        if overflow > 0:
            self.count("dropped_sink", overflow)
            self.on_dropped(self.sink.name, overflow)
        self.wakeup.set()

    def _pop(self, n: int) -> None:
        for _ in range(n):
            self.buffer.popleft()
            self.bytes -= self.sizes.popleft()

    async def run(self) -> None:
        delay = self.settings.retry_min_seconds
        while True:
            if not self.buffer:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = [self.buffer[i] for i in range(min(len(self.buffer), self.settings.batch_size))]
            try:
                await self._write(batch)
            except Exception as exc:  # noqa: BLE001 - any sink failure: keep the batch, retry
                self.count(f"sink_error:{self.sink.name}", 1)
                if not self.failing:
                    log.warning(
                        "telemetry sink %s failed, buffering: %s: %s",
                        self.sink.name, type(exc).__name__, exc,
                    )
                self.failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_seconds)
                continue
            if self.failing:
                log.info("telemetry sink %s recovered", self.sink.name)
                self.failing = False
            delay = self.settings.retry_min_seconds

    async def _write(self, events: list[RequestEvent]) -> None:
        """Write ``events`` (the head of the buffer) and take them off the buffer.

        On :class:`RejectedBatch` the halves are written in order, down to single events,
        so what is done (written or rejected) is always a prefix of the buffer: any other
        error on the way leaves exactly the rest for the retry.
        """
        try:
            await self.sink.write(events)
        except RejectedBatch as exc:
            if len(events) > 1:
                middle = len(events) // 2
                await self._write(events[:middle])
                await self._write(events[middle:])
                return
            self._reject(events[0], exc)
        else:
            self.count(f"written:{self.sink.name}", len(events))
        self._pop(len(events))

    def _reject(self, event: RequestEvent, exc: RejectedBatch) -> None:
        self.count(f"rejected:{self.sink.name}", 1)
        # Identifiers only: the reason may quote a value, never the prompt.
        log.error(
            "telemetry sink %s rejected event %s (client %.64r, model %.64r) and carries on: %.300s",
            self.sink.name, event.request_id, event.client, event.model, exc,
        )


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
        self._on_dropped = on_dropped or alert_dropped
        self._queue: asyncio.Queue[tuple[EventSource, int]] = asyncio.Queue(
            self.settings.queue_size
        )
        self._queued_bytes = 0
        self._building = 0  # taken off the queue, not yet in the lanes
        self._lanes = [_Lane(s, self.settings, self._count, self._on_dropped) for s in sinks]
        self._tasks: list[asyncio.Task[None]] = []
        self._drop_log = ThrottledLog(log, interval=DROP_LOG_SECONDS)

    def _count(self, fate: str, n: int) -> None:
        self.stats[fate] += n
        if self._extra_count is not None:
            self._extra_count(fate, n)

    def emit(self, event: EventSource) -> bool:
        """Hand one event over without waiting; False (counted and logged) when the queue
        is full, by count or by bytes."""
        size = size_of(event)
        if self._queued_bytes + size > self.settings.queue_bytes:
            self._drop("dropped_queue_bytes")
            return False
        try:
            self._queue.put_nowait((event, size))
        except asyncio.QueueFull:
            self._drop("dropped_queue_full")
            return False
        self._queued_bytes += size
        self._count("emitted", 1)
        return True

    def queued_bytes(self) -> int:
        """Roughly the memory held by events waiting in the queue."""
        return self._queued_bytes

    def _drop(self, fate: str) -> None:
        # Under a flood this runs per request: one log line per DROP_LOG_SECONDS.
        self._count(fate, 1)
        self._drop_log.error("telemetry queue full, events dropped (%s)", fate)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._drain(), name="telemetry-drain")]
        self._tasks += [
            asyncio.create_task(lane.run(), name=f"telemetry-{lane.sink.name}")
            for lane in self._lanes
        ]

    async def _drain(self) -> None:
        while True:
            items = [await self._queue.get()]
            self._building = 1  # pending (and counted if stopped) while it lingers
            if self._queue.qsize() < self.settings.batch_size:
                # Linger so that one hop to the build thread serves many requests: at light
                # load every event would otherwise be a batch (and a thread hop) of its own.
                await asyncio.sleep(BUILD_LINGER_SECONDS)
            # Collect what else is waiting, then give writers a full batch at a time.
            while len(items) < self.settings.batch_size:
                try:
                    items.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            # Until they reach the lanes they count as pending (and as lost if stopped now).
            self._building = len(items)
            self._queued_bytes -= sum(size for _, size in items)
            sources = [item for item, _ in items]
            del items
            if all(isinstance(item, RequestEvent) for item in sources):
                events = _build_all(sources)
            else:  # hashing, normalising and parsing: off the event loop
                events = await asyncio.to_thread(_build_all, sources)
            ready = [e for e in events if e is not None]
            if len(ready) < len(events):
                self._count("dropped_build_error", len(events) - len(ready))
            sizes = [approx_bytes(e) for e in ready]
            for lane in self._lanes:
                lane.put(ready, sizes)
            self._building = 0

    def pending(self) -> int:
        """Events not yet written by every sink (queued or buffered)."""
        buffered = max((len(lane.buffer) for lane in self._lanes), default=0)
        return self._queue.qsize() + self._building + buffered

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
        left = self._queue.qsize() + self._building
        for lane in self._lanes:
            lost = left + len(lane.buffer)
            if lost:
                self._count("dropped_shutdown", lost)
                self._on_dropped(lane.sink.name, lost)
            await lane.sink.close()


def _build_all(items: list[EventSource]) -> list[RequestEvent | None]:
    return [_materialise(item) for item in items]


def _materialise(item: EventSource) -> RequestEvent | None:
    if isinstance(item, RequestEvent):
        return item
    try:
        return item()
    except Exception:  # a bug in an event builder must not stop the pipeline
        log.exception("building a telemetry event failed")
        return None


_drop_alerts = ThrottledLog(log, interval=DROP_LOG_SECONDS)


def alert_dropped(sink: str, n: int) -> None:
    """The default ``on_dropped``: lost telemetry is an operational alert (detection, or the
    record of requests, is blind for those events), logged at most every few seconds."""
    _drop_alerts.error("ALERT telemetry: %d events for sink %s were dropped", n, sink)
