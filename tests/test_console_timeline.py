"""A client's 24-hour timeline is counted in the database, on both: a heavy client's
every event is in it (its totals are those of a COUNT over the same rows, which the admin
API's ``usage_24h`` is), in the hour it happened."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.console.data import ConsoleData
from modelfence.detect.state import SqlState
from modelfence.store import create_tables, transaction
from modelfence.store.schema import request_events

from .test_console_pages import record
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

EVENTS = 25_000  # more than one client's events were ever bucketed in Python
SPAN = timedelta(hours=21)


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


def _event(client: str, ts: datetime, i: int) -> dict[str, Any]:
    return {
        "ts": ts, "request_id": f"r{client}{i}", "client": client, "key_id": "k1",
        "tier": "default", "route": "chat", "model": "fake-chat",
        "status": 429 if i % 10 == 0 else 200, "ip_prefix": "10.0.0.0/24", "fingerprint": "f",
        "prompt_hash": "h", "prompt_len": 5, "tokens_in": i % 7, "tokens_out": i % 11,
        "latency_ms": 1.0, "limit_decision": "allowed", "risk_level": "normal", "detail": {},
    }


async def test_a_heavy_clients_timeline_counts_every_event(engine: AsyncEngine) -> None:
    state = SqlState(engine)
    await state.publish([record("heavy", 0.9, level="block")])
    now = datetime.now(UTC)
    first = now - SPAN
    stamps = [first + SPAN * i / EVENTS for i in range(EVENTS)]
    rows = [_event("heavy", ts, i) for i, ts in enumerate(stamps)]
    rows += [_event("heavy", now - timedelta(hours=30, minutes=i), i) for i in range(50)]  # older
    rows += [_event("other", now - timedelta(hours=2), i) for i in range(30)]
    async with transaction(engine, write=True) as conn:
        for start in range(0, len(rows), 5000):
            await conn.execute(request_events.insert(), rows[start : start + 5000])

    view = await ConsoleData(state).client("heavy")

    assert view is not None and len(view.timeline) == 24
    events = request_events.c
    async with transaction(engine) as conn:
        count, tokens_in, tokens_out = (
            await conn.execute(
                select(func.count(), func.sum(events.tokens_in), func.sum(events.tokens_out))
                .where(events.client == "heavy", events.ts >= view.timeline[0].start)
            )
        ).one()
    assert count == EVENTS
    assert sum(hour.requests for hour in view.timeline) == count
    assert sum(hour.tokens_in for hour in view.timeline) == tokens_in
    assert sum(hour.tokens_out for hour in view.timeline) == tokens_out
    assert sum(hour.refused for hour in view.timeline) == EVENTS // 10
    # Each event in the hour it happened, as counting them one by one puts it.
    start = view.timeline[0].start
    expected = [0] * 24
    for ts in stamps:
        expected[min(23, int((ts - start) / timedelta(hours=1)))] += 1
    assert [hour.requests for hour in view.timeline] == expected
    assert [hour.start for hour in view.timeline] == [
        start + timedelta(hours=i) for i in range(24)
    ]
