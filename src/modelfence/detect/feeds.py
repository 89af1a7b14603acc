"""How events travel from gateways to detectors: two transports, each a sink and a feed.

- one machine: a ``multiprocessing`` queue into the detector child process of ``serve``
  (:class:`QueueSink` → :class:`QueueFeed`);
- several replicas: Redis Streams, one stream per partition, a client always in the same
  partition (CRC-32 of its name), so one ``modelfence detect`` worker sees all of a
  client's queries and per-client state needs no sharing (:class:`RedisStreamSink` →
  :class:`RedisStreamFeed`; a consumer group per stream gives at-least-once delivery).

Sinks implement :class:`~modelfence.telemetry.pipeline.Sink` (the pipeline retries them);
feeds implement :class:`EventFeed`.
"""

from __future__ import annotations

import asyncio
import queue
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
from redis.exceptions import ResponseError

from modelfence.telemetry.events import RequestEvent

STREAM_PREFIX = "modelfence:events:"
GROUP = "detect"
STREAM_MAXLEN = 1_000_000  # per partition, approximate: a stalled worker cannot fill Redis


def partition_of(client: str, partitions: int) -> int:
    return zlib.crc32(client.encode()) % partitions


def worker_partitions(worker: int, workers: int, partitions: int) -> list[int]:
    """The partitions worker ``worker`` (0-based) of ``workers`` consumes."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in 0..{workers - 1}, got {worker}")
    return [p for p in range(partitions) if p % workers == worker]


def event_from_dict(data: dict[str, Any]) -> RequestEvent:
    return RequestEvent(**data)


class EventFeed(Protocol):
    async def read(self, max_events: int, timeout: float) -> list[RequestEvent] | None:
        """Up to ``max_events`` (possibly none after ``timeout``); None once closed."""
        ...

    async def ack(self) -> None:
        """The events of the last read are processed."""
        ...


class QueueSink:
    name = "detector"

    def __init__(self, q: Any) -> None:  # a multiprocessing.Queue
        self.queue = q

    async def write(self, events: Sequence[RequestEvent]) -> None:
        self.queue.put_nowait([e.to_dict() for e in events])  # queue.Full: the lane retries

    async def close(self) -> None:
        """The queue belongs to the detector process handle."""


class QueueFeed:
    _CLOSED = None

    def __init__(self, q: Any) -> None:
        self.queue = q

    async def read(self, max_events: int, timeout: float) -> list[RequestEvent] | None:
        try:
            batch = await asyncio.to_thread(self.queue.get, True, timeout)
        except queue.Empty:
            return []
        if batch is self._CLOSED:
            return None
        return [event_from_dict(d) for d in batch]

    async def ack(self) -> None:
        """Queue delivery is at-most-once; nothing to acknowledge."""


class RedisStreamSink:
    name = "detector"

    def __init__(self, redis: Any, partitions: int) -> None:
        self.redis = redis
        self.partitions = partitions

    async def write(self, events: Sequence[RequestEvent]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            stream = f"{STREAM_PREFIX}{partition_of(event.client, self.partitions)}"
            pipe.xadd(
                stream, {"e": orjson.dumps(event.to_dict())}, maxlen=STREAM_MAXLEN, approximate=True
            )
        await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


class RedisStreamFeed:
    def __init__(self, redis: Any, partitions: Sequence[int], consumer: str) -> None:
        self.redis = redis
        self.streams = [f"{STREAM_PREFIX}{p}" for p in partitions]
        self.consumer = consumer
        self._pending: dict[str, list[bytes]] = {}
        self._ready = False

    async def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._ready = True

    async def read(self, max_events: int, timeout: float) -> list[RequestEvent] | None:
        if not self._ready:
            await self._ensure_groups()
        reply = await self.redis.xreadgroup(
            GROUP,
            self.consumer,
            {s: ">" for s in self.streams},
            count=max_events,
            block=max(int(timeout * 1000), 1),
        )
        events = []
        for stream, entries in reply or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                self._pending.setdefault(name, []).append(entry_id)
                events.append(event_from_dict(orjson.loads(fields[b"e"])))
        return events

    async def ack(self) -> None:
        for stream, ids in self._pending.items():
            if ids:
                await self.redis.xack(stream, GROUP, *ids)
        self._pending = {}
