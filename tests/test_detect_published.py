"""What the detector publishes for the console, on SQLite and PostgreSQL: every published
change is a risk-history row, pruned after the retention; reasons carry the statistic, its
threshold and when it first crossed it, which a restarted detector keeps; query maps are
published per client against a reference written once, bounded and overwritten."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.config import DetectionConfig
from modelfence.console.data import ConsoleData
from modelfence.detect.alerts import Alerter
from modelfence.detect.calibration import calibrate
from modelfence.detect.engine import DetectionEngine
from modelfence.detect.published import MAP_EVERY_SECONDS
from modelfence.detect.querymap import MAX_POINTS, REFERENCE_POINTS, space_maps
from modelfence.detect.reference import Reference, fit_space
from modelfence.detect.service import DetectorService
from modelfence.detect.state import SqlState
from modelfence.store import create_tables, transaction
from modelfence.store.schema import client_query_maps, client_risk_history, reference_maps

from .test_detect_streams import benign_chat, harvester, natural_vectors, perturbation_sweep
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


class Clock:
    """Monotonic seconds the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def service(
    engine: AsyncEngine,
    *,
    reference: Reference | None = None,
    config: DetectionConfig | None = None,
    clock: Clock | None = None,
) -> DetectorService:
    alerter = Alerter(engine, webhook_url=None, public_url="http://gw", dedup_seconds=3600)
    detector = DetectorService(
        DetectionEngine(config or DetectionConfig(), reference=reference),
        SqlState(engine),
        alerter,
    )
    if clock is not None:
        detector.views.clock = clock
    return detector


async def rows(engine: AsyncEngine, table: Any, **where: Any) -> list[dict[str, Any]]:
    query = select(table).where(*(table.c[k] == v for k, v in where.items()))
    async with transaction(engine) as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings().all()]


async def test_every_published_change_is_a_history_row_and_old_rows_are_pruned(
    engine: AsyncEngine,
) -> None:
    now = datetime.now(UTC)
    old = [{"client": "gone", "at": now - timedelta(days=d), "risk": 0.5, "level": "tighten"}
           for d in (3, 2)]
    recent = {"client": "kept", "at": now - timedelta(hours=20), "risk": 0.3, "level": "alert"}
    async with transaction(engine, write=True) as conn:
        await conn.execute(client_risk_history.insert(), [*old, recent])

    detector = service(engine, config=DetectionConfig(history_retention_days=1))
    published = []
    events = harvester("thief", 120, seed=1)
    for i in range(0, len(events), 20):
        published += await detector.handle(events[i : i + 20])

    thief = await rows(engine, client_risk_history, client="thief")
    assert len(thief) == len(published) >= 3  # alert, ..., block: one row per publish
    assert [r["level"] for r in thief] == [r.level for r in published]
    assert [r["risk"] for r in thief] == [r.risk for r in published]
    assert thief[-1]["level"] == "block"
    assert all(r["at"] >= now for r in thief)
    # The first batch pruned what is older than a day; a row of 20 hours ago stays.
    assert await rows(engine, client_risk_history, client="gone") == []
    assert len(await rows(engine, client_risk_history, client="kept")) == 1


async def test_an_operator_pin_is_in_the_history_too(engine: AsyncEngine) -> None:
    from modelfence.detect.actions import Policy
    from modelfence.detect.overrides import OperatorActions

    await OperatorActions(SqlState(engine), Policy(DetectionConfig())).pin(
        "mallory", "block", "ticket 7"
    )
    [row] = await rows(engine, client_risk_history, client="mallory")
    assert row["level"] == "block"


async def test_reasons_carry_their_evidence_and_since_survives_a_restart(
    engine: AsyncEngine,
) -> None:
    events = harvester("thief", 120, seed=1)
    first = service(engine)
    for i in range(0, 60, 20):
        await first.handle(events[i : i + 20])
    record = await SqlState(engine).get("thief")
    assert record is not None and record.reasons
    crossed = {}
    for reason in record.reasons:
        assert {"code", "text", "score", "value", "threshold", "since"} <= reason.keys()
        assert reason["value"] > reason["threshold"]  # both detectors: larger is suspicious
        assert events[0].ts <= reason["since"] <= events[59].ts
        crossed[reason["code"]] = reason["since"]
    harvesting = next(r for r in record.reasons if r["code"] == "llm_harvesting")
    assert harvesting["threshold"] == 0.5  # the documented default

    second = service(engine)  # a new detector process: the first-crossing times are kept
    republished = []
    for i in range(60, 120, 20):
        republished += await second.handle(events[i : i + 20])
    assert republished, "the thief's risk moved on: its record was published again"
    for reason in republished[-1].reasons:
        if reason["code"] in crossed:
            assert reason["since"] == crossed[reason["code"]]


async def test_records_published_before_reasons_had_evidence_still_resume(
    engine: AsyncEngine,
) -> None:
    from .test_console_pages import record

    old = [{"code": "llm_harvesting", "text": "share 0.9 > 0.5", "score": 0.8}]
    await SqlState(engine).publish([record("thief", 0.8, level="degrade", reasons=old)])
    detector = service(engine)
    published = await detector.handle(benign_chat("thief", 10, seed=3, start=10.0))
    resumed = detector.engine.risks["thief"].reasons["llm_harvesting"]
    assert resumed.value is None and resumed.since is None
    assert not published or published[-1].reasons  # the old reason read, nothing failed


@pytest.fixture(scope="module")
def reference() -> Reference:
    benign = [e for seed in range(6) for e in natural_vectors(f"b{seed}", 80, seed)]
    vectors = np.array([e.input_rows[0] for e in benign if e.input_rows], dtype=np.float32)
    space = replace(fit_space(vectors, cells=16, seed=0), coverage_median=0.1)
    return Reference({"vec16": space}, {"mmd_shift": 0.05, "coverage_growth": 0.9})


async def test_query_maps_are_published_bounded_and_overwritten(
    engine: AsyncEngine, reference: Reference
) -> None:
    clock = Clock()
    detector = service(engine, reference=reference, clock=clock)
    events = sorted(perturbation_sweep("sweeper", 500, seed=1)
                    + natural_vectors("honest", 300, seed=9), key=lambda e: e.ts)
    for i in range(0, len(events), 50):
        await detector.handle(events[i : i + 50])
        clock.now += MAP_EVERY_SECONDS / 4  # a batch every 15 s
    clock.now += MAP_EVERY_SECONDS
    await detector.handle(perturbation_sweep("sweeper", 20, seed=2, start=events[-1].ts))

    [ref] = await rows(engine, reference_maps)
    assert ref["space"] == "vec16" and ref["cells"] == 16 and ref["coverage_median"] == 0.1
    assert len(ref["points"]) == min(REFERENCE_POINTS, len(reference.spaces["vec16"].sample))
    assert len(ref["shares"]) == 16 and abs(sum(ref["shares"]) - 1.0) < 1e-3
    [sweeper] = await rows(engine, client_query_maps, client="sweeper")
    assert sweeper["reference"] == ref["reference"] and sweeper["space"] == "vec16"
    assert len(sweeper["points"]) == len(sweeper["cells"]) == MAX_POINTS  # the newest 200
    assert sweeper["queries"] == 520  # rewritten with the last batch, not kept from the first
    assert all(0 <= c < 16 for c in sweeper["cells"])
    # The newest points are the client's newest queries, projected like the reference.
    projection = space_maps(reference)["vec16"]
    window = np.array([q.vector for q in detector.engine.clients["sweeper"].queries])
    expected = projection.project(window[-MAX_POINTS:])
    assert np.allclose(np.array(sweeper["points"]), expected, atol=1e-3)

    # A restarted detector writes the same reference (same projection), not a second one.
    again = service(engine, reference=reference, clock=Clock())
    await again.handle(natural_vectors("late", 20, seed=4, start=events[-1].ts))
    assert [r["reference"] for r in await rows(engine, reference_maps)] == [ref["reference"]]
    async with transaction(engine) as conn:
        count = (await conn.execute(select(func.count()).select_from(client_query_maps))).scalar()
    assert count == 3  # one row per client, however often written

    pooled = await ConsoleData(SqlState(engine)).query_map(["sweeper", "honest", "nobody"])
    assert pooled is not None and [c.client for c in pooled.clients] == ["sweeper", "honest"]
    assert pooled.reference.cells == 16 and pooled.left_out == []
    alone = await ConsoleData(SqlState(engine)).query_map(["sweeper"])
    assert alone is not None and alone.counted == 100
    assert alone.benign_cells(alone.counted) == pytest.approx(10.0)  # 0.1 of 100 queries
    assert alone.covered == len(set(sweeper["cells"][-100:]))


async def test_maps_and_reference_maps_are_pruned_with_the_history(
    engine: AsyncEngine, reference: Reference
) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=30)
    stale = {"client": "old", "reference": "r" * 32, "space": "vec16", "points": [[0, 0]],
             "cells": [0], "queries": 1, "updated_at": long_ago}
    orphan = {"reference": "r" * 32, "space": "vec16", "cells": 1, "points": [], "shares": [1.0],
              "coverage_median": None, "created_at": long_ago}
    async with transaction(engine, write=True) as conn:
        await conn.execute(client_query_maps.insert(), [stale])
        await conn.execute(reference_maps.insert(), [orphan])
    detector = service(engine, reference=reference, clock=Clock())
    await detector.handle(natural_vectors("new", 20, seed=5))
    assert [r["client"] for r in await rows(engine, client_query_maps)] == ["new"]
    assert len(await rows(engine, reference_maps)) == 1  # the orphan went, the live one stays


async def test_no_reference_no_maps(engine: AsyncEngine) -> None:
    detector = service(engine, clock=Clock())
    await detector.handle(natural_vectors("plain", 40, seed=6))
    assert await rows(engine, client_query_maps) == []
    assert await ConsoleData(SqlState(engine)).query_map(["plain"]) is None


def test_calibration_keeps_the_benign_coverage_median(tmp_path: Path) -> None:
    benign = {f"b{seed}": natural_vectors(f"b{seed}", 120, seed) for seed in range(12)}
    embedder: Any = None  # classifier rows only: nothing to embed
    reference = calibrate(benign, config=DetectionConfig(), embedder=embedder, cells=8)
    median = reference.spaces["vec16"].coverage_median
    assert median is not None and 0 < median <= 1
    reference.save(tmp_path / "ref.npz")
    assert Reference.load(tmp_path / "ref.npz").spaces["vec16"].coverage_median == median
    plain = Reference({"vec16": replace(reference.spaces["vec16"], coverage_median=None)})
    plain.save(tmp_path / "old.npz")  # a reference made before the median was kept
    assert Reference.load(tmp_path / "old.npz").spaces["vec16"].coverage_median is None
