"""Telemetry and detection as the gateway runs them: one object ``app.py`` starts and stops.

It owns the event pipeline (sinks: the state database, optional OTel spans, and the
detector feed), the detector child process (``detection.feed: process``) or the Redis
Stream producer (``feed: redis``), and the :class:`ActionCache` every request reads. It
hands ``app.py`` two stage factories::

    runtime = DetectionRuntime(config, engine, metrics, secret)
    await runtime.start()
    stages = [runtime.emit_stage, authenticated, fingerprinting, runtime.enforce_stage, ...]
    ...
    await runtime.stop()
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.admin.detection import detection_router
from modelfence.config import Config
from modelfence.detect.actions import Policy
from modelfence.detect.feeds import RedisStreamSink
from modelfence.detect.process import DetectorProcess, redis_url
from modelfence.detect.state import RedisState, SqlState, StateReader
from modelfence.gateway.detection import ActionCache, Enforce
from modelfence.gateway.telemetry import EmitEvents
from modelfence.identity.secret import ServerSecret
from modelfence.telemetry.metrics import Metrics
from modelfence.telemetry.pipeline import EventPipeline, PipelineSettings, Sink
from modelfence.telemetry.sinks import OtelSink, SqlSink
from modelfence.types import ASGIApp

log = logging.getLogger("modelfence.detect")


class DetectionRuntime:
    def __init__(
        self, config: Config, engine: AsyncEngine, metrics: Metrics, secret: ServerSecret
    ) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.hash_key = secret.derive("telemetry-prompt-hash", 32)
        self.sql_state = SqlState(engine)
        self.redis: Redis | None = None
        self.detector: DetectorProcess | None = None
        self.pipeline: EventPipeline | None = None
        self.actions: ActionCache | None = None
        self._counters: dict[str, Any] = {}

    def _sinks(self) -> list[Sink]:
        telemetry, detection = self.config.telemetry, self.config.detection
        sinks: list[Sink] = [
            SqlSink(
                self.engine,
                store_prompt_text=telemetry.store_prompt_text,
                retention_days=telemetry.retention_days,
            )
        ]
        if telemetry.otel_spans:
            sinks.append(OtelSink())
        if detection.enabled and detection.feed == "process":
            self.detector = DetectorProcess(self.config)
            sinks.append(self.detector.sink())
        elif detection.enabled:
            assert self.redis is not None
            sinks.append(RedisStreamSink(self.redis, detection.partitions))
        return sinks

    async def start(self) -> None:
        telemetry, detection = self.config.telemetry, self.config.detection
        if detection.enabled and detection.feed == "redis":
            self.redis = Redis.from_url(redis_url(self.config))
        if telemetry.enabled:
            settings = PipelineSettings(
                queue_size=telemetry.queue_size,
                batch_size=telemetry.batch_size,
                buffer_events=telemetry.buffer_events,
                retry_max_seconds=telemetry.retry_max_seconds,
            )
            self.pipeline = EventPipeline(
                self._sinks(), settings=settings, count=self._count, on_dropped=self._dropped
            )
            if self.detector is not None:
                self.detector.start()
            await self.pipeline.start()
        if detection.enabled:
            reader: StateReader = (
                RedisState(self.redis) if self.redis is not None else self.sql_state
            )
            self.actions = ActionCache(reader, poll_seconds=detection.state_poll_seconds)
            await self.actions.start()

    async def stop(self) -> None:
        if self.actions is not None:
            await self.actions.stop()
        if self.pipeline is not None:
            await self.pipeline.stop()
        if self.detector is not None:
            await asyncio.to_thread(self.detector.stop)
        if self.redis is not None:
            await self.redis.aclose()

    def _count(self, fate: str, n: int) -> None:
        # Called once per emitted event: label children are cached (labels() costs µs).
        child = self._counters.get(fate)
        if child is None:
            kind, _, sink = fate.partition(":")
            if kind == "sink_error":
                child = self.metrics.sink_errors.labels(sink)
            else:
                child = self.metrics.events.labels(kind)
            self._counters[fate] = child
        child.inc(n)

    def _dropped(self, sink: str, n: int) -> None:
        # Loss of telemetry is an operational alert: detection is blind for those events.
        log.error("ALERT telemetry: %d events for sink %s were dropped", n, sink)

    def emit_stage(self, app: ASGIApp) -> ASGIApp:
        if self.pipeline is None:
            return app
        return EmitEvents(app, emit=self.pipeline.emit, hash_key=self.hash_key)

    def enforce_stage(self, app: ASGIApp) -> ASGIApp:
        if self.actions is None:
            return app
        return Enforce(app, actions=self.actions, metrics=self.metrics)

    def admin_router(self) -> APIRouter:
        shared = RedisState(self.redis) if self.redis is not None else None
        return detection_router(self.sql_state, Policy(self.config.detection), shared=shared)
