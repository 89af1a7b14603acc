"""How events travel from gateways to detectors: two transports, each a sink and a feed.

- one machine: a ``multiprocessing`` queue into the detector child process of ``serve``
  (:class:`QueueSink` → :class:`QueueFeed`);
- several replicas: Redis Streams, one stream per partition, a client always in the same
  partition (CRC-32 of its name), so one ``modelfence detect`` worker sees all of a
  client's queries and per-client state needs no sharing (:class:`RedisStreamSink` →
  :class:`RedisStreamFeed`; a consumer group per stream gives at-least-once delivery).
  On a Redis Cluster the partitions' streams spread over the masters by their names; a
  worker reads those of each slot with its own ``XREADGROUP`` (one command may not span
  slots).

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
from redis.crc import key_slot
from redis.exceptions import ResponseError

from modelfence.redisconn import REDIS_ERRORS, is_cluster
from modelfence.telemetry.events import RequestEvent

STREAM_PREFIX = "modelfence:events:"
GROUP = "detect"
STREAM_MAXLEN = 1_000_000  # per partition, approximate: a stalled worker cannot fill Redis
BLOCKING_READS = 8  # slots an idle cluster read waits on at once: a node's pool stays free


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
        try:
            self.queue.put_nowait([e.to_dict() for e in events])
        except queue.Full:  # the lane keeps the batch and retries
            raise queue.Full("the detector is behind: its queue of batches is full") from None

    async def close(self) -> None:
        """The queue belongs to the detector process handle."""


class QueueFeed:
    """Reads the sink's batches; a backlog is merged into one read of whole sink batches
    until it holds at least ``max_events`` (so it may exceed it by one sink batch), so a
    detector that fell behind catches up in large batches (per-batch costs, and the
    embedder's per-call cost, amortise) instead of one small sink batch at a time."""

    _CLOSED = None

    def __init__(self, q: Any) -> None:
        self.queue = q
        self._closed = False

    async def read(self, max_events: int, timeout: float) -> list[RequestEvent] | None:
        if self._closed:
            return None
        try:
            batch = await asyncio.to_thread(self.queue.get, True, timeout)
        except queue.Empty:
            return []
        if batch is self._CLOSED:
            return None
        dicts = list(batch)
        while len(dicts) < max_events:  # a sink batch is never split: its events stay together
            try:
                more = self.queue.get_nowait()
            except queue.Empty:
                break
            if more is self._CLOSED:
                self._closed = True  # the events read so far are handled first
                break
            dicts.extend(more)
        return [event_from_dict(d) for d in dicts]

    async def ack(self) -> None:
        """Queue delivery is at-most-once; nothing to acknowledge."""


class RedisStreamSink:
    """Writes each batch with one pipeline per server (per master on a cluster), per-command
    errors returned, not raised: when part of a batch fails, the events written are
    remembered and the pipeline's retry of the same batch sends only the others, so a
    dead master duplicates nothing on the live ones."""

    name = "detector"

    def __init__(self, redis: Any, partitions: int) -> None:
        self.redis = redis
        self.partitions = partitions
        self._written: dict[int, RequestEvent] = {}  # by id(): the failed batch holds them

    async def write(self, events: Sequence[RequestEvent]) -> None:
        todo = [e for e in events if id(e) not in self._written]
        by_node: dict[str, list[tuple[str, RequestEvent]]] = {}
        if is_cluster(self.redis):
            await self.redis.initialize()  # the slot map, read again after a failure
        for event in todo:
            stream = f"{STREAM_PREFIX}{partition_of(event.client, self.partitions)}"
            node = self.redis.get_node_from_key(stream).name if is_cluster(self.redis) else ""
            by_node.setdefault(node, []).append((stream, event))
        failures: list[Exception] = []
        # one server after the other: a failing one makes the client drop every connection
        for batch in by_node.values():
            try:
                results = await self._send(batch)
            except REDIS_ERRORS as exc:
                failures.append(exc)
                continue
            for (_, event), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    failures.append(result)
                else:
                    self._written[id(event)] = event
        if not failures:
            self._written = {}
            return
        self._written = {id(e): e for e in events if id(e) in self._written}
        if is_cluster(self.redis):
            await self.redis.aclose()  # the next write reads a fresh slot map
        raise failures[0]

    async def _send(self, batch: list[tuple[str, RequestEvent]]) -> list[Any]:
        """One pipeline to one server; each command's error is returned, not raised."""
        pipe = self.redis.pipeline(transaction=False)
        for stream, event in batch:
            pipe.xadd(stream, {"e": orjson.dumps(event.to_dict())}, maxlen=STREAM_MAXLEN,
                      approximate=True)
        return list(await pipe.execute(raise_on_error=False))

    async def close(self) -> None:
        await self.redis.aclose()


class RedisStreamFeed:
    """Reads a worker's partitions through one consumer group per stream.

    A slot that fails (a dead master, a lost group) costs only its own events, which stay
    pending: at start and after any failure the consumer first re-reads its own pending
    entries (ID ``0``), delivered but never acknowledged, so nothing delivered is lost.
    ``NOGROUP`` (a group lost with its master, or a stream deleted) recreates the groups.
    """

    def __init__(self, redis: Any, partitions: Sequence[int], consumer: str) -> None:
        self.redis = redis
        self.streams = [f"{STREAM_PREFIX}{p}" for p in partitions]
        # streams one XREADGROUP may read together: all on one server, one slot's on a cluster
        self.groups = [self.streams]
        if is_cluster(redis):
            slots: dict[int, list[str]] = {}
            for stream in self.streams:
                slots.setdefault(key_slot(stream.encode()), []).append(stream)
            self.groups = list(slots.values())
        self._first = 0
        self.consumer = consumer
        self._pending: dict[str, list[bytes]] = {}
        self._ready = False
        self._backlog = True

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
        if self._backlog:
            self._backlog = False  # set again by any failure on the way
            replies = await self._sweep(max_events, "0")
            if any(entries for reply in replies for _, entries in reply or []):
                self._backlog = True  # until a sweep finds nothing pending
                return self._events(replies)
        block = max(int(timeout * 1000), 1)
        if len(self.groups) > 1:
            replies = await self._sweep(max_events, ">")
            if any(entries for reply in replies for _, entries in reply or []):
                return self._events(replies)
        return self._events(await self._wait(max_events, block))

    def _events(self, replies: list[Any]) -> list[RequestEvent]:
        events = []
        for stream, entries in (entry for reply in replies for entry in reply or []):
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                self._pending.setdefault(name, []).append(entry_id)
                if fields:  # none for a pending entry that MAXLEN trimmed since
                    events.append(event_from_dict(orjson.loads(fields[b"e"])))
        return events

    async def _sweep(self, max_events: int, entry_id: str) -> list[Any]:
        """What is waiting, slot by slot without blocking, up to ``max_events`` in all. Each
        sweep starts one slot further, so a busy slot cannot starve the others."""
        replies, failures, left = [], [], max_events
        self._first = (self._first + 1) % len(self.groups)
        for group in self.groups[self._first :] + self.groups[: self._first]:
            try:
                reply = await self._read(group, left, None, entry_id)
            except REDIS_ERRORS as exc:
                failures.append(exc)
                continue
            replies.append(reply)
            left -= sum(len(entries) for _, entries in reply or [])
            if left <= 0:
                break
        await self._recover(failures, len(replies))
        return replies

    async def _wait(self, max_events: int, block: int) -> list[Any]:
        """An idle worker's wait for new events, on up to :data:`BLOCKING_READS` slots at
        once (the next ones in turn; the others are swept on the next read), answered
        after ``block`` ms at the latest."""
        count = min(len(self.groups), BLOCKING_READS)
        groups = (self.groups[self._first :] + self.groups[: self._first])[:count]
        share = -(-max_events // count)  # ceil: the whole batch spans the slots
        outcomes = await asyncio.gather(
            *(self._read(group, share, block, ">") for group in groups), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, REDIS_ERRORS):
                raise failure
        replies = [o for o in outcomes if not isinstance(o, BaseException)]
        await self._recover(failures, len(replies))
        return replies

    async def _recover(self, failures: Sequence[BaseException], succeeded: int) -> None:
        """After failed reads: re-read what is pending next time, recreate lost groups,
        read a fresh cluster map; raise only if no read succeeded."""
        if not failures:
            return
        self._backlog = True
        if any("NOGROUP" in str(failure) for failure in failures):
            self._ready = False
        if is_cluster(self.redis) and not all(isinstance(f, ResponseError) for f in failures):
            await self.redis.aclose()  # a node failed: read a fresh map on the next read
        if succeeded == 0:
            raise failures[0]

    async def _read(self, streams: list[str], count: int, block: int | None, entry_id: str
                    ) -> Any:
        """One ``XREADGROUP``; on a cluster sent straight to the slot's master, so the
        client asks no other node (its default node) for the command's keys first."""
        options: dict[str, Any] = {}
        if is_cluster(self.redis):
            await self.redis.initialize()  # after aclose(): read the map again
            options["target_nodes"] = self.redis.get_node_from_key(streams[0])
        pieces: list[Any] = ["GROUP", GROUP, self.consumer, "COUNT", count]
        if block is not None:
            pieces += ["BLOCK", block]
        pieces += ["STREAMS", *streams, *([entry_id] * len(streams))]
        return await self.redis.execute_command("XREADGROUP", *pieces, **options)

    async def ack(self) -> None:
        for stream, ids in self._pending.items():
            if ids:
                await self.redis.xack(stream, GROUP, *ids)
        self._pending = {}
