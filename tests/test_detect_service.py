"""The detector service: verdicts published to shared state, audited, alerted once."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.config import DetectionConfig
from modelfence.detect.alerts import Alerter
from modelfence.detect.cache import ActionCache
from modelfence.detect.engine import DetectionEngine
from modelfence.detect.service import DetectorService
from modelfence.detect.state import SqlState
from modelfence.store import create_tables, transaction
from modelfence.store.schema import detection_alerts, detection_audit

from .test_detect_streams import benign_chat, harvester, natural_vectors
from .test_store_database import scratch_engine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield engine


def service(
    engine: AsyncEngine, posts: list[dict[str, Any]], *, shadow: bool = False
) -> DetectorService:
    async def post(url: str, payload: dict[str, Any]) -> None:
        posts.append({"url": url, **payload})

    alerter = Alerter(
        engine,
        webhook_url="https://hooks.example/x",
        public_url="https://gw.example",
        dedup_seconds=3600,
        post=post,
    )
    return DetectorService(
        DetectionEngine(DetectionConfig()), SqlState(engine), alerter, shadow=shadow
    )


async def test_verdicts_are_published_audited_and_alerted_once(engine: AsyncEngine) -> None:
    posts: list[dict[str, Any]] = []
    detector = service(engine, posts)
    events = sorted(
        harvester("thief", 120, seed=1) + benign_chat("user", 60, seed=2), key=lambda e: e.ts
    )
    for i in range(0, len(events), 20):
        await detector.handle(events[i : i + 20])
    state = SqlState(engine)
    thief = await state.get("thief")
    assert thief is not None and thief.level == "block" and thief.reasons
    assert (await state.actions())["thief"].blocks
    user = await state.get("user")
    assert user is not None and user.level == "normal"
    async with transaction(engine) as conn:
        audit = (
            await conn.execute(
                select(detection_audit.c.previous, detection_audit.c.action).where(
                    detection_audit.c.client == "thief"
                )
            )
        ).all()
        alerts = (await conn.execute(select(detection_alerts))).mappings().all()
    assert audit[0] == ("normal", audit[0][1]) and audit[-1][1] == "block"
    # One alert per level climbed, each delivered, with the admin link and reasons.
    assert [a["level"] for a in alerts] == [lvl for _, lvl in audit]
    assert all(a["delivered"] for a in alerts)
    assert "https://gw.example/admin/v1/clients/thief" in posts[-1]["text"]
    assert "thief" in posts[-1]["text"] and "Why:" in posts[-1]["text"]


async def test_alerts_are_deduplicated(engine: AsyncEngine) -> None:
    posts: list[dict[str, Any]] = []
    alerter = service(engine, posts).alerter
    record = await _record(engine)
    assert await alerter.alert(record, now=100.0)
    assert not await alerter.alert(record, now=200.0)
    assert await alerter.alert(record, now=100.0 + 3601)
    assert len(posts) == 2


async def _record(engine: AsyncEngine) -> Any:
    detector = service(engine, [])
    for i in range(0, 120, 20):
        await detector.handle(harvester("thief", 120, seed=1)[i : i + 20])
    return await SqlState(engine).get("thief")


async def test_shadow_mode_records_but_never_acts(engine: AsyncEngine) -> None:
    detector = service(engine, [], shadow=True)
    for i in range(0, 120, 20):
        await detector.handle(harvester("thief", 120, seed=1)[i : i + 20])
    state = SqlState(engine)
    record = await state.get("thief")
    assert record is not None and record.level == "block" and record.shadow
    cache = ActionCache(state, poll_seconds=1)
    await cache.refresh()
    assert cache.get("thief").level == "normal"


async def test_the_gateway_cache_keeps_its_snapshot_when_the_state_fails(
    engine: AsyncEngine,
) -> None:
    detector = service(engine, [])
    for i in range(0, 120, 20):
        await detector.handle(harvester("thief", 120, seed=1)[i : i + 20])
    cache = ActionCache(SqlState(engine), poll_seconds=1)
    await cache.refresh()
    assert cache.get("thief").blocks and cache.level_for("thief") == "high"
    await engine.dispose()

    class Broken:
        async def actions(self) -> dict[str, Any]:
            raise OSError("database gone")

    cache.reader = Broken()
    assert not await cache.poller.once()
    assert cache.get("thief").blocks and cache.failures == 1


async def test_a_restarted_detector_resumes_published_risk(engine: AsyncEngine) -> None:
    first = service(engine, [])
    for i in range(0, 120, 20):
        await first.handle(harvester("thief", 120, seed=1)[i : i + 20])
    # A fresh process: the thief's next quiet-looking queries do not wipe its record.
    second = service(engine, [])
    later = benign_chat("thief", 10, seed=3, start=300.0)
    await second.handle(later)
    record = await SqlState(engine).get("thief")
    assert record is not None and record.level == "block"


def links_listed(
    detector: DetectorService, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, float]]:
    """(client, event time) of every listing of links the detector makes from now on."""
    listed: list[tuple[str, float]] = []
    linker = detector.engine.linker
    links_of = linker.links_of

    def counted(client: str, now: float) -> Any:
        listed.append((client, now))
        return links_of(client, now)

    monkeypatch.setattr(linker, "links_of", counted)
    return listed


async def test_a_republished_member_lists_its_links_afresh_only_when_its_entity_changes_or_a_minute_passed(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = service(engine, [])
    listed = links_listed(detector, monkeypatch)
    events = sorted(
        harvester("thief", 150, seed=1, ip_prefix="net")
        + harvester("twin", 100, seed=2, start=100.0, ip_prefix="net"),
        key=lambda e: e.ts,
    )
    published = []
    for i in range(0, len(events), 5):
        published += [r for r in await detector.handle(events[i : i + 5]) if r.client == "thief"]
    times = [now for client, now in listed if client == "thief"]
    # Published often (its risk climbs in steps), listed once alone, once on joining the twin
    # (its entity changed) and then at most once a minute over the 300 s it is seen.
    assert len(published) > len(times) + 3
    assert len(times) <= 2 + 300 // 60
    assert all(b - a >= 60.0 for a, b in itertools.pairwise(times[2:]))
    last = await SqlState(engine).get("thief")
    assert last is not None and last.entity is not None
    assert last.links is not None and [(x["other"], x["kinds"]) for x in last.links] == [
        ("twin", ["ip_prefix"])
    ]


async def test_a_client_the_engine_evicted_is_forgotten_here_too_and_resumed_when_it_returns(
    engine: AsyncEngine,
) -> None:
    detector = service(engine, [])
    thief = harvester("thief", 100, seed=1)
    for i in range(0, len(thief), 20):
        await detector.handle(thief[i : i + 20])
    risk = detector.engine.risks["thief"]
    assert "thief" in detector._published and risk.risk > 0.5
    # Seven hours on (idle_evict_hours is 6) only another client is busy.
    await detector.handle(benign_chat("user", 30, seed=2, start=7 * 3600.0))
    assert "thief" not in detector.engine.clients
    assert "thief" not in detector._published and "thief" not in detector._links_at
    await detector.handle(harvester("thief", 10, seed=3, start=7 * 3600.0 + 200))
    assert detector.engine.risks["thief"] is risk  # its own risk, not one re-read from the store
    record = await SqlState(engine).get("thief")
    assert record is not None and record.level == "block"


async def test_links_listed_at_a_time_ahead_of_the_clock_are_listed_again(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = service(engine, [])
    listed = links_listed(detector, monkeypatch)
    events = harvester("thief", 150, seed=1)
    early = events[:20]
    early[-1].ts += 3600.0  # one event stamped by a clock an hour ahead
    await detector.handle(early)
    assert listed and listed[-1][1] == early[-1].ts
    before = len(listed)
    published = []
    for i in range(20, len(events), 5):
        published += await detector.handle(events[i : i + 5])
    assert published  # republished as its risk climbed, with its links listed again
    assert len(listed) > before and all(now < early[-1].ts for _, now in listed[before:])


def test_a_published_record_has_a_column_for_each_of_its_fields() -> None:
    """The upsert runs with many rows at once, where a key no column takes is dropped
    without a word: a new record field needs its column (and a migration) first."""
    from dataclasses import fields

    from modelfence.detect.state import ClientRecord
    from modelfence.store.schema import client_risk

    assert {f.name for f in fields(ClientRecord)} == {c.name for c in client_risk.columns}


async def test_rows_beyond_what_float32_computes_with_are_clamped_and_counted(engine: AsyncEngine) -> None:
    """Classifier rows of 1e39 and 1e30 (valid JSON) overflowed float32 (inf, or inf once
    squared: numpy warned, and the tests raise warnings); they are clamped to ±1e15, still
    queries, and the detector's metrics count them."""
    rows = natural_vectors("user", 200, seed=4)
    rows[50].input_rows = [[1e39] * 16, [-1e30] * 16, [1.0] * 16]
    rows[60].input_rows = [[float("nan")] * 16]  # not from the gateway (its JSON has no NaN)
    detector = service(engine, [])
    for i in range(0, len(rows), 20):
        await detector.handle(rows[i : i + 20])
    assert detector.engine.verdict("user").queries == 202
    assert detector.metrics.clamped_rows._value.get() == 3
