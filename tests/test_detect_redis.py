"""Several replicas: events through Redis Streams to two partitioned detect workers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from modelfence.config import parse_config
from modelfence.detect.cache import ActionCache
from modelfence.detect.feeds import (
    GROUP,
    STREAM_PREFIX,
    RedisStreamSink,
    partition_of,
    worker_partitions,
)
from modelfence.detect.process import run_worker
from modelfence.detect.state import RedisState, SqlState
from modelfence.store import create_tables, open_engine

from .services import private_redis
from .test_detect_streams import benign_chat, harvester

pytestmark = pytest.mark.redis
PARTITIONS = 4


def test_partitions_are_split_between_workers_without_overlap() -> None:
    shares = [worker_partitions(w, 3, 8) for w in range(3)]
    assert sorted(p for share in shares for p in share) == list(range(8))
    with pytest.raises(ValueError):
        worker_partitions(3, 3, 8)


async def test_two_workers_each_judge_their_own_partitions(tmp_path: Path) -> None:
    with private_redis() as (url, _proc):
        config = parse_config(
            {
                "store": f"sqlite:///{tmp_path / 'state.db'}",
                "detection": {
                    "feed": "redis",
                    "redis_url": url,
                    "partitions": PARTITIONS,
                    "embedder": "hashing",
                },
            }
        )
        thieves = ["thief-a", "thief-b", "thief-c"]
        users = ["user-a", "user-b", "user-c"]  # sorted
        owners = {c: partition_of(c, PARTITIONS) % 2 for c in thieves + users}
        assert set(owners.values()) == {0, 1}, "the clients must land on both workers"
        redis = Redis.from_url(url)
        workers = [asyncio.create_task(run_worker(config, w, 2)) for w in (0, 1)]
        try:
            events = [e for i, c in enumerate(thieves) for e in harvester(c, 100, seed=i)]
            events += [e for i, c in enumerate(users) for e in benign_chat(c, 60, seed=10 + i)]
            events.sort(key=lambda e: e.ts)
            sink = RedisStreamSink(redis, PARTITIONS)
            for i in range(0, len(events), 100):
                await sink.write(events[i : i + 100])
            replica = ActionCache(RedisState(redis), poll_seconds=0.1)
            engine = open_engine(config.store)
            try:
                await create_tables(engine)  # the workers may not have got that far yet
                state = SqlState(engine)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    await replica.refresh()
                    records = await state.get_many(users)
                    if len(records) == len(users) and all(replica.get(c).blocks for c in thieves):
                        break
                    await asyncio.sleep(0.2)
                for task in workers:  # a crashed worker should fail loudly, not time out
                    if task.done():
                        task.result()
                assert all(replica.get(c).blocks for c in thieves)
                assert all(replica.get(c).level == "normal" for c in users)
                assert sorted(r.client for r in records) == users
                assert all(r.level == "normal" for r in records)
            finally:
                await engine.dispose()
            # Each stream was read by exactly the worker that owns its partition.
            for p in range(PARTITIONS):
                consumers = await redis.xinfo_consumers(f"{STREAM_PREFIX}{p}", GROUP)
                names = {c["name"].decode() for c in consumers}
                assert names <= {f"worker-{p % 2}"}
        finally:
            for task in workers:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 15)
            await redis.aclose()


def test_the_detect_command_refuses_the_process_feed(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from modelfence.cli import app

    config = tmp_path / "modelfence.yaml"
    config.write_text("detection: {feed: process}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["--config", str(config), "detect"])
    assert result.exit_code == 2
    assert "serve" in result.output
