"""Detection's background loops survive the errors real Redis raises, and recover."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError, ResponseError, TimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.config import parse_config
from modelfence.detect.actions import Action, Level
from modelfence.detect.cache import ActionCache
from modelfence.detect.process import redis_client
from modelfence.detect.state import ClientRecord, RedisState
from modelfence.store import create_tables

from .services import private_redis, wait_for_port
from .test_detect_service import service
from .test_detect_streams import harvester
from .test_store_database import scratch_engine

REDIS_FAULTS = [
    ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused."),
    TimeoutError("Timeout reading from 127.0.0.1:6390"),
    ResponseError(
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT."
    ),
]


class FlakyReader:
    """A StateReader whose first calls fail the way redis-py fails."""

    def __init__(self, faults: list[Exception], actions: dict[str, Action]) -> None:
        self.faults = list(faults)
        self.result = actions
        self.calls = 0

    async def actions(self) -> dict[str, Action]:
        self.calls += 1
        if self.faults:
            raise self.faults.pop(0)
        return self.result


async def _until(predicate: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fault", REDIS_FAULTS, ids=lambda e: type(e).__name__)
async def test_the_action_cache_keeps_polling_after_a_redis_error(fault: Exception) -> None:
    reader = FlakyReader([fault, fault], {"thief": Action("block")})
    cache = ActionCache(reader, poll_seconds=0.01)
    await cache.start()
    try:
        await _until(lambda: cache.get("thief").blocks)
        assert cache.get("thief").blocks
    finally:
        await cache.stop()


class FlakyFeed:
    """An EventFeed that fails like a Redis Stream, then delivers, then closes."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = list(steps)
        self.acks = 0

    async def read(self, max_events: int, timeout: float) -> list[Any] | None:
        step = self.steps.pop(0) if self.steps else None
        if isinstance(step, Exception):
            raise step
        return step

    async def ack(self) -> None:
        self.acks += 1


class FlakyShared:
    """A RedisState whose first publishes fail the way redis-py fails."""

    def __init__(self, faults: list[Exception]) -> None:
        self.faults = list(faults)
        self.published: list[Any] = []

    async def publish(self, records: list[Any]) -> None:
        if self.faults:
            raise self.faults.pop(0)
        self.published += records


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield engine


async def test_the_detector_keeps_running_after_redis_errors(engine: AsyncEngine) -> None:
    detector = service(engine, [])
    shared = FlakyShared(list(REDIS_FAULTS))
    detector.shared = shared  # type: ignore[assignment]
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    detector._sleep = no_wait
    events = harvester("thief", 120, seed=1)
    feed = FlakyFeed([*REDIS_FAULTS, *(events[i : i + 20] for i in range(0, 120, 20)), [], []])
    await asyncio.wait_for(detector.run(feed, timeout=0.01), 30)
    assert any(r.client == "thief" and r.level == "block" for r in shared.published)
    assert detector.loop is not None and detector.loop.errors == 2 * len(REDIS_FAULTS)
    assert waits[:3] == [0.5, 1.0, 2.0]  # backoff, reset by the first success
    assert feed.acks == 6 + 2


@pytest.mark.redis
async def test_the_action_cache_rides_out_a_killed_and_restarted_redis(tmp_path: Path) -> None:
    with private_redis() as (url, proc):
        config = parse_config({"detection": {"feed": "redis", "redis_url": url}})
        redis = redis_client(config)
        errors: list[str] = []
        cache = ActionCache(
            RedisState(redis), poll_seconds=0.05, on_error=lambda task, exc: errors.append(task)
        )
        cache.poller.min_backoff = cache.poller.max_backoff = 0.05  # retry at the poll rate
        await cache.start()
        replacement = None
        try:
            proc.kill()
            proc.wait(10)
            await _until(lambda: len(errors) >= 2)
            assert errors and set(errors) == {"detection-state"} and cache.poller.running
            port = url.rsplit(":", 1)[1].split("/")[0]
            replacement = await asyncio.create_subprocess_exec(
                str(shutil.which("redis-server")), "--port", port, "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            await asyncio.to_thread(wait_for_port, "127.0.0.1", int(port), 10)
            await RedisState(redis).publish([_record("thief", "block")])
            await _until(lambda: cache.get("thief").blocks)
            assert cache.get("thief").blocks and cache.poller.failures == 0
        finally:
            await cache.stop()
            await redis.aclose()
            if replacement is not None:
                replacement.kill()
                await replacement.wait()


def _record(client: str, level: Level) -> ClientRecord:
    return ClientRecord(
        client=client, tier="default", entity=None, risk=0.99, level=level, quota_share=0.1,
        reasons=[], queries=500, shadow=False, updated_at=datetime.now(UTC),
    )


def test_the_detection_redis_client_has_timeouts() -> None:
    config = parse_config({"detection": {"feed": "redis", "redis_url": "redis://127.0.0.1:1/0"}})
    options = redis_client(config).connection_pool.connection_kwargs
    assert options["socket_connect_timeout"] and options["socket_timeout"]
