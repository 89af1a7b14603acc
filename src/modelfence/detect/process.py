"""Where the detector runs: a child process of ``serve``, or ``modelfence detect`` workers.

Either way it runs outside the gateway's event loop (and outside its GIL) and executes
the same :class:`~modelfence.detect.service.DetectorService`:

- :class:`DetectorProcess` — the default on one machine. ``serve`` starts it at start-up;
  events reach it through a bounded ``multiprocessing`` queue (the telemetry pipeline's
  ``detector`` sink), verdicts go to the state database the gateway polls.
- :func:`run_worker` — ``modelfence detect --worker I --workers N`` with
  ``detection.feed: redis``; each worker owns a share of the Redis Stream partitions.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from modelfence.config import Config
from modelfence.detect.feeds import (
    EventFeed,
    QueueFeed,
    QueueSink,
    RedisStreamFeed,
    worker_partitions,
)
from modelfence.store import create_tables, open_engine

if TYPE_CHECKING:
    from modelfence.detect.engine import DetectionEngine

log = logging.getLogger("modelfence.detect")

QUEUE_BATCHES = 200  # batches (of up to telemetry.batch_size events) waiting for the child


def redis_url(config: Config) -> str:
    url = config.detection.redis_url or config.limits.backend
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(
            "detection.feed: redis needs detection.redis_url (or a Redis limits.backend)"
        )
    return url


def build_engine(config: Config) -> DetectionEngine:
    # Imported here: the gateway process imports this module but never loads numpy/scipy.
    from threadpoolctl import threadpool_limits

    from modelfence.detect.embedding import load_embedder
    from modelfence.detect.engine import DetectionEngine
    from modelfence.detect.reference import Reference

    # One BLAS thread: the detector's matrices are small, and a multi-threaded BLAS on a
    # machine busy with the gateway spends most of its time waiting (8× slower, measured).
    threadpool_limits(1)
    detection = config.detection
    reference = Reference.load(detection.reference_file) if detection.reference_file else None
    return DetectionEngine(
        detection, embedder=load_embedder(detection.embedder), reference=reference
    )


async def run_service(config: Config, feed: EventFeed, *, shared: Redis | None = None) -> None:
    """Run one detector on ``feed`` until it closes."""
    from modelfence.detect.alerts import Alerter
    from modelfence.detect.service import DetectorService
    from modelfence.detect.state import RedisState, SqlState

    engine = open_engine(config.store)
    try:
        await create_tables(engine)
        detection = config.detection
        alerter = Alerter(
            engine,
            webhook_url=detection.webhook_url,
            public_url=detection.public_url,
            dedup_seconds=detection.alert_dedup_seconds,
        )
        service = DetectorService(
            build_engine(config),
            SqlState(engine),
            alerter,
            shared=RedisState(shared) if shared is not None else None,
            shadow=detection.shadow,
        )
        log.info("detector running (pid %d)", os.getpid())
        await service.run(feed)
    finally:
        await engine.dispose()


def _child_main(config: Config, q: Any) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run_service(config, QueueFeed(q)))


class DetectorProcess:
    """The detector as a child process of the gateway, fed through a bounded queue."""

    def __init__(self, config: Config) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a running event loop
        self.queue = context.Queue(QUEUE_BATCHES)
        self.process = context.Process(
            target=_child_main, args=(config, self.queue), name="modelfence-detector", daemon=True
        )

    def start(self) -> None:
        self.process.start()

    def sink(self) -> QueueSink:
        return QueueSink(self.queue)

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the child to finish its queue and exit; terminate it after ``timeout``."""
        if self.process.is_alive():
            try:
                self.queue.put(None, timeout=1)
            except queue.Full:  # the child is stuck anyway
                log.warning("detector queue full at shutdown")
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(2)
        self.queue.close()
        self.queue.join_thread()


async def run_worker(config: Config, worker: int, workers: int) -> None:
    """One ``modelfence detect`` worker consuming its partitions of the event streams."""
    redis = Redis.from_url(redis_url(config))
    partitions = worker_partitions(worker, workers, config.detection.partitions)
    log.info("detect worker %d/%d: partitions %s", worker, workers, partitions)
    try:
        feed = RedisStreamFeed(redis, partitions, consumer=f"worker-{worker}")
        await run_service(config, feed, shared=redis)
    finally:
        await redis.aclose()
