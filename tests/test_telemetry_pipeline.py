"""The event pipeline under overflow and sink outages: every event written or counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from sqlalchemy import func, select

from modelfence.store import create_tables, transaction
from modelfence.store.schema import request_events
from modelfence.telemetry.events import RequestEvent
from modelfence.telemetry.pipeline import EventPipeline, PipelineSettings
from modelfence.telemetry.sinks import SqlSink, event_row

from .test_store_database import scratch_engine, store_url  # noqa: F401  (fixture)

FAST = PipelineSettings(
    queue_size=1000,
    batch_size=10,
    buffer_events=1000,
    retry_min_seconds=0.01,
    retry_max_seconds=0.05,
)


def make_event(i: int, **fields: object) -> RequestEvent:
    base: dict[str, object] = {
        "ts": time.time(),
        "request_id": f"r{i}",
        "client": "acme",
        "key_id": "key_1",
        "tier": "default",
        "route": "/v1/chat/completions",
        "model": "m",
        "status": 200,
    }
    return RequestEvent(**(base | fields))  # type: ignore[arg-type]


class FlakySink:
    name = "flaky"

    def __init__(self) -> None:
        self.down = False
        self.written: list[str] = []
        self.closed = False

    async def write(self, events: Sequence[RequestEvent]) -> None:
        if self.down:
            raise ConnectionError("sink is down")
        self.written += [e.request_id for e in events]

    async def close(self) -> None:
        self.closed = True


async def eventually(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    sink = FlakySink()
    pipeline = EventPipeline([sink], settings=PipelineSettings(queue_size=5))
    accepted = [pipeline.emit(make_event(i)) for i in range(8)]  # not started: nothing drains
    assert accepted == [True] * 5 + [False] * 3
    assert pipeline.stats["dropped_queue_full"] == 3 and pipeline.stats["emitted"] == 5
    await pipeline.start()
    await pipeline.stop()
    assert sink.written == [f"r{i}" for i in range(5)] and sink.closed


async def test_a_sink_outage_is_buffered_and_retried_in_order() -> None:
    sink = FlakySink()
    sink.down = True
    pipeline = EventPipeline([sink], settings=FAST)
    await pipeline.start()
    for i in range(50):
        pipeline.emit(make_event(i))
    await eventually(lambda: pipeline.stats["sink_error:flaky"] >= 3)
    assert sink.written == [] and pipeline.pending() == 50
    sink.down = False
    assert await pipeline.flush(5)
    assert sink.written == [f"r{i}" for i in range(50)]  # exactly once, in order
    assert pipeline.stats["written:flaky"] == 50
    await pipeline.stop()


async def test_what_outlives_the_buffer_is_dropped_counted_and_reported() -> None:
    sink = FlakySink()
    sink.down = True
    reported: list[tuple[str, int]] = []
    settings = PipelineSettings(
        batch_size=10, buffer_events=20, retry_min_seconds=0.01, retry_max_seconds=0.02
    )
    pipeline = EventPipeline(
        [sink], settings=settings, on_dropped=lambda s, n: reported.append((s, n))
    )
    await pipeline.start()
    for i in range(50):
        pipeline.emit(make_event(i))
    await eventually(lambda: pipeline.stats["dropped_sink"] == 30)
    sink.down = False
    assert await pipeline.flush(5)
    await pipeline.stop()
    assert len(sink.written) == 20 and sum(n for _, n in reported) == 30
    stats = pipeline.stats
    assert stats["emitted"] == stats["written:flaky"] + stats["dropped_sink"]


async def test_what_is_left_at_shutdown_is_counted() -> None:
    sink = FlakySink()
    sink.down = True
    pipeline = EventPipeline([sink], settings=FAST)
    await pipeline.start()
    for i in range(7):
        pipeline.emit(make_event(i))
    await pipeline.stop(timeout=0.1)
    assert pipeline.stats["dropped_shutdown"] == 7


async def test_events_are_built_in_the_pipeline_and_a_broken_builder_is_counted() -> None:
    sink = FlakySink()
    pipeline = EventPipeline([sink], settings=FAST)
    await pipeline.start()

    def broken() -> RequestEvent:
        raise KeyError("bug")

    pipeline.emit(lambda: make_event(1))
    pipeline.emit(broken)
    assert await pipeline.flush(5)
    await pipeline.stop()
    assert sink.written == ["r1"] and pipeline.stats["dropped_build_error"] == 1


def test_prompt_text_is_stored_only_when_configured() -> None:
    event = make_event(1, prompt_text="secret plans", prompt_hash="ab", input_rows=[[1.0]], output_margins=[0.5])
    assert "prompt_text" not in event_row(event, store_prompt_text=False)["detail"]
    row = event_row(event, store_prompt_text=True)
    assert row["detail"]["prompt_text"] == "secret plans" and row["prompt_hash"] == "ab"
    assert "input_rows" not in row["detail"] and "output_margins" not in row["detail"]


async def test_sql_sink_writes_batches_and_applies_retention(store_url: str) -> None:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        now = time.time()
        sink = SqlSink(engine, retention_days=1, clock=lambda: now)
        old = [make_event(i) for i in range(3)]
        for e in old:
            e.ts = now - 3 * 86400
        await sink.write([*old, make_event(9)])  # the first write also applies retention
        async with transaction(engine) as conn:
            ids = (await conn.execute(select(request_events.c.request_id))).scalars().all()
        assert ids == ["r9"]
        await sink.write([make_event(10)])
        async with transaction(engine) as conn:
            assert (
                await conn.execute(select(func.count()).select_from(request_events))
            ).scalar() == 2


async def test_odd_text_values_are_cleaned_not_retried_forever(store_url: str) -> None:  # noqa: F811
    # A model name with a NUL byte or past VARCHAR(200) once stalled the lane for good.
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        pipeline = EventPipeline([SqlSink(engine)], settings=FAST)
        await pipeline.start()
        for i, model in enumerate(["m", "bad\x00model", "x" * 300, "m\ud800", "m"]):
            pipeline.emit(make_event(i, model=model, client=f"c\x00{i}"))
        assert await pipeline.flush(5)
        pipeline.emit(make_event(9))
        assert await pipeline.flush(5)
        await pipeline.stop()
        async with transaction(engine) as conn:
            rows = (await conn.execute(select(request_events.c.model))).scalars().all()
        assert sorted(rows) == sorted(["m", "badmodel", "x" * 200, "m\ufffd", "m", "m"])
        assert pipeline.stats["written:store"] == 6 and pipeline.stats["sink_error:store"] == 0


async def test_a_poison_event_is_isolated_counted_and_the_rest_written(store_url: str) -> None:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        rejected: list[tuple[str, int]] = []
        pipeline = EventPipeline(
            [SqlSink(engine)], settings=FAST, count=lambda fate, n: rejected.append((fate, n))
        )
        await pipeline.start()
        # An upstream reporting absurd usage: no INTEGER column holds it, on any database.
        for i in range(7):
            pipeline.emit(make_event(i, tokens_out=2**70 if i == 3 else 5))
        assert await pipeline.flush(5)
        pipeline.emit(make_event(9))  # and the lane carries on
        assert await pipeline.flush(5)
        await pipeline.stop()
        async with transaction(engine) as conn:
            ids = (await conn.execute(select(request_events.c.request_id))).scalars().all()
        assert sorted(ids) == ["r0", "r1", "r2", "r4", "r5", "r6", "r9"]
        stats = pipeline.stats
        assert stats["rejected:store"] == 1 and stats["written:store"] == 7
        assert stats["emitted"] == stats["written:store"] + stats["rejected:store"]
        assert ("rejected:store", 1) in rejected
