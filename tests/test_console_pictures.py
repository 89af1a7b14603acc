"""The client page's pictures: the risk history and query maps read on both databases, the
SVG geometry bounded however much there is, and the page itself (in process, behind the
real guard): both pictures with titles and their numbers in words, the tier's thresholds
from the detection config the console was given, hostile names escaped, no inline style,
and a plain sentence where there is nothing to draw."""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import orjson
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.config import ConsoleConfig, DetectionConfig
from modelfence.console import charts, create_console, pictures
from modelfence.console.data import ConsoleData
from modelfence.console.pictures import RiskHistory, RiskPoint
from modelfence.detect.actions import Policy
from modelfence.detect.overrides import OperatorActions
from modelfence.detect.published import write_maps
from modelfence.detect.querymap import space_maps
from modelfence.detect.reference import Reference, fit_space
from modelfence.detect.state import SqlState
from modelfence.forensics.service import Forensics
from modelfence.identity import SqlKeyStore
from modelfence.store import create_tables, transaction
from modelfence.store.schema import client_risk_history
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.keys import WatermarkKeyring

from .test_admin_api import SECRET, TOKEN
from .test_auth_failures import admin_failures
from .test_console_pages import HOSTILE_NAMES, record
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

TIERS = {"default": {"alert": 0.25, "tighten": 0.45, "degrade": 0.65, "block": 0.85},
         "tiny": {"alert": 0.1, "tighten": 0.2, "degrade": 0.3, "block": 0.4}}
DETECTION = DetectionConfig.model_validate({"tiers": TIERS})


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


async def add_history(engine: AsyncEngine, client: str, changes: list[tuple[timedelta, float, str]]
                      ) -> None:
    now = datetime.now(UTC)
    async with transaction(engine, write=True) as conn:
        await conn.execute(client_risk_history.insert(), [
            {"client": client, "at": now - ago, "risk": risk, "level": level}
            for ago, risk, level in changes
        ])


def reference_of(seed: int, dims: int = 8) -> Reference:
    rng = np.random.default_rng(seed)
    space = fit_space(rng.normal(size=(300, dims)).astype(np.float32), cells=12, seed=seed)
    space = type(space)(space.sample, space.centroids, space.ood_radius, space.bandwidth, 0.05)
    return Reference({f"vec{dims}": space})


async def add_maps(engine: AsyncEngine, reference: Reference, clients: dict[str, int]) -> None:
    """Each client's ``n`` queries drawn around the reference (and a few far off)."""
    [projection] = space_maps(reference).values()
    now = datetime.now(UTC)
    rng = np.random.default_rng(len(clients))
    dims = projection.mean.shape[0]
    rows = []
    for client, n in clients.items():
        vectors = rng.normal(size=(n, dims)).astype(np.float32)
        vectors[:3] += 40.0  # beyond the honest reference's area
        rows.append(projection.client_row(client, vectors, queries=n, now=now))
    await write_maps(engine, references=[projection.reference_row(now)], clients=rows)


# --- reads, on both databases ---------------------------------------------------------


async def test_the_risk_history_starts_where_it_was_and_keeps_the_tiers_thresholds(
    engine: AsyncEngine,
) -> None:
    state = SqlState(engine)
    await state.publish([record("b", 0.35, level="alert", tier="tiny")])  # a row at now
    await add_history(engine, "b", [(timedelta(days=3), 0.05, "normal"),
                                     (timedelta(hours=30), 0.12, "alert"),
                                     (timedelta(hours=20), 0.25, "tighten"),
                                     (timedelta(hours=2), 0.5, "block")])
    data = ConsoleData(state, detection=DETECTION)

    day = await data.risk_history("b")
    assert day.before is not None and (day.before.risk, day.before.level) == (0.12, "alert")
    assert [(p.risk, p.level) for p in day.points] == [(0.25, "tighten"), (0.5, "block"),
                                                        (0.35, "alert")]
    assert day.thresholds == TIERS["tiny"] and day.tier == "tiny"
    assert [(prev, p.level) for prev, p in day.level_changes()] == [
        ("alert", "tighten"), ("tighten", "block"), ("block", "alert")]
    week = await data.risk_history("b", span=timedelta(days=7))
    assert week.before is None and len(week.points) == 5 and not week.truncated
    unknown = await data.risk_history("nobody")
    assert unknown.empty and unknown.thresholds == TIERS["default"]


async def test_a_long_history_is_read_bounded(engine: AsyncEngine,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pictures, "HISTORY_ROWS", 50)
    await add_history(engine, "busy", [(timedelta(minutes=i), i / 200, "normal")
                                       for i in range(120)])
    history = await ConsoleData(SqlState(engine)).risk_history("busy")
    assert history.truncated and len(history.points) == 50 and history.before is None
    assert history.points[-1].risk == 0.0  # the newest kept, oldest first
    assert [p.at for p in history.points] == sorted(p.at for p in history.points)


async def test_query_maps_pool_clients_on_one_reference(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await add_maps(engine, reference_of(1), {"a": 150, "b": 80})
    await add_maps(engine, reference_of(2, dims=6), {"c": 60})
    data = ConsoleData(SqlState(engine))

    pooled = await data.query_map(["a", "b", "c", "a", "missing"])
    assert pooled is not None and [c.client for c in pooled.clients] == ["a", "b"]
    assert pooled.left_out == ["c"] and pooled.reference.space == "vec8"
    assert pooled.points == 230 and pooled.counted == 180
    assert pooled.covered == len({*pooled.clients[0].cells[-100:], *pooled.clients[1].cells})
    assert 0 < pooled.benign_share_reached <= 1.0
    assert pooled.benign_cells(100) == pytest.approx(5.0)  # median 0.05 of 100 queries
    summary = pooled.summary()
    assert summary["covered"] == pooled.covered and "points" not in summary
    assert [c["client"] for c in summary["clients"]] == ["a", "b"]
    alone = await data.query_map(["c"])
    assert alone is not None and alone.reference.space == "vec6"
    assert await data.query_map(["missing"]) is None and await data.query_map([]) is None

    monkeypatch.setattr(pictures, "MAP_CLIENTS", 1)
    capped = await data.query_map(["b", "a"])
    assert capped is not None and [c.client for c in capped.clients] == ["b"]
    assert capped.left_out == ["a"]


# --- geometry -------------------------------------------------------------------------


def test_the_risk_chart_is_bounded_and_marks_each_change_of_level() -> None:
    end = datetime(2026, 12, 1, 12, tzinfo=UTC)
    start = end - timedelta(hours=24)
    levels = ["normal", "alert"]
    points = [RiskPoint(start + timedelta(seconds=4 * i), (i % 97) / 97, levels[(i // 200) % 2])
              for i in range(20_000)]
    history = RiskHistory("c", start, end, "default", dict(TIERS["default"]), None, points, False)
    chart = charts.risk_chart(history)
    assert chart is not None
    vertices = chart.path.split()
    assert len(vertices) <= 2 * charts.MAX_VERTICES + 2
    assert all(chart.left <= float(v.split(",")[0]) <= chart.right for v in vertices)
    assert all(chart.top <= float(v.split(",")[1]) <= chart.bottom for v in vertices)
    assert len(chart.marks) == charts.MAX_MARKS and chart.hidden_marks == 99 - charts.MAX_MARKS
    assert [t.name for t in chart.thresholds] == ["block", "degrade", "tighten", "alert"]
    labels = [t.label_y for t in chart.thresholds]
    assert all(b - a >= charts.LABEL_GAP for a, b in itertools.pairwise(labels))
    assert [t.label for t in chart.x_ticks] == ["16:00", "20:00", "00:00", "04:00", "08:00",
                                                "12:00"]

    same = {"alert": 0.5, "tighten": 0.5, "degrade": 0.5, "block": 0.5}  # labels stay apart
    flat = RiskHistory("c", start, end, "t", same, RiskPoint(start, 0.2, "normal"), [], False)
    drawn = charts.risk_chart(flat)
    assert drawn is not None
    level = round(drawn.bottom - 0.2 * (drawn.bottom - drawn.top), 1)
    assert drawn.path == f"{drawn.left:g},{level:g} {drawn.right:g},{level:g}"  # held all along
    labels = [t.label_y for t in drawn.thresholds]
    assert all(b - a >= charts.LABEL_GAP for a, b in itertools.pairwise(labels))
    assert charts.risk_chart(RiskHistory("c", start, end, "t", same, None, [], False)) is None


def test_the_scatter_frames_the_reference_and_bounds_the_dots() -> None:
    reference = pictures.ReferenceMap("r", "text", 4, [(-1.0, -1.0), (1.0, 1.0), (0.0, 0.5)],
                                      [0.25] * 4, None)
    far = [(50.0, 0.0)] * 10
    near = [(0.1 * (i % 10), -0.1) for i in range(5_000)]
    now = datetime.now(UTC)
    many = pictures.ClientQueries("x", far + near, [0] * 5_010, 5_010, now)
    drawn = charts.scatter(pictures.QueryMap(reference, [many], []))
    assert drawn.total == 5_010 and drawn.outside == 10
    assert len(drawn.queries) <= charts.MAX_QUERY_DOTS
    size = charts.MAP_SIZE
    assert all(0 <= d.x <= size and 0 <= d.y <= size for d in drawn.reference + drawn.queries)
    low, high = drawn.reference[0], drawn.reference[1]
    assert low.x < high.x and low.y > high.y  # up is up


# --- the page --------------------------------------------------------------------------


@pytest.fixture
async def console(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    state = SqlState(engine)
    app = create_console(
        data=ConsoleData(state, detection=DETECTION),
        actions=OperatorActions(state, Policy(DETECTION)),
        forensics=Forensics(engine, WatermarkKeyring(SECRET), WatermarkConfig()),
        admin_token=TOKEN,
        failures=admin_failures(),
        settings=ConsoleConfig(),
    )
    transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/console", app=app)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        assert (await client.post("/console/login", data={"token": TOKEN})).status_code == 303
        yield client


def svg_parts(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.DOTALL)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_the_client_page_draws_risk_and_queries_with_hostile_names_escaped(
    engine: AsyncEngine, console: httpx.AsyncClient
) -> None:
    state = SqlState(engine)
    timing = [{"code": "machine_timing", "text": "regular", "score": 0.5, "value": 0.97,
               "threshold": 0.9, "since": datetime(2026, 11, 30, 8, tzinfo=UTC).timestamp()},
              {"code": "prada_distance", "text": "W low", "score": 0.4, "value": 0.71,
               "threshold": 0.82, "since": datetime(2026, 11, 30, 9, tzinfo=UTC).timestamp()},
              {"code": "llm_harvesting", "text": "an old reason", "score": 0.3}]
    await state.publish([record(name, 0.9, level="block", reasons=timing)
                         for name in HOSTILE_NAMES])
    for name in HOSTILE_NAMES:
        await add_history(engine, name, [(timedelta(hours=10), 0.3, "alert")])
    await add_maps(engine, reference_of(3), dict.fromkeys(HOSTILE_NAMES, 120))

    for name in HOSTILE_NAMES:
        response = await console.get("/console/client", params={"name": name})
        assert response.status_code == 200, (name, response.text[:300])
        page = response.text
        assert "<script>alert(1)" not in page and 'href="javascript:' not in page
        assert " style=" not in page and "<script" not in page.replace("&lt;script", "")
        risk, queries = svg_parts(page)
        assert "<title" in risk and "<title" in queries
        for threshold in ("alert 0.25", "tighten 0.45", "degrade 0.65", "block 0.85"):
            assert threshold in risk  # the detection config the console was given
        assert 'class="mark mark-block"' in risk  # alert → block, marked
        assert "alert → block" in page and "went from 0.30 to 0.90" in page
        assert page.count('<circle cx=') >= 100 and "hollow" in page
        assert re.search(r"Its last 100 queries fall in \d+ of the 12 cells of the honest "
                         r"reference; an honest client.s last 100 typically fall in 5 ", page)
        assert ("measured 0.97 against a threshold of 0.9, above it since "
                "2026-11-30 08:00:00 UTC") in page
        assert "measured 0.71 against a threshold of 0.82, below it since" in page
        assert page.count("In numbers:") == 2  # the old reason has its text only

    name = HOSTILE_NAMES[0]
    week = await console.get("/console/client", params={"name": name, "span": "7d"})
    assert week.status_code == 200 and "Risk over the last 7 days" in week.text
    assert 'span=7d" aria-current="page"' in week.text
    bad = await console.get("/console/client", params={"name": name, "span": "1y"})
    assert bad.status_code == 400 and "span: " in bad.text
    export = orjson.loads((await console.get("/console/evidence.json",
                                             params={"name": name})).content)
    assert [p["level"] for p in export["risk_history"]["points"]] == ["alert", "block"]
    assert export["query_map"]["clients"][0]["client"] == name
    assert export["record"]["reasons"][0]["since"] == timing[0]["since"]
    report = (await console.get("/console/report", params={"name": name})).text
    assert len(svg_parts(report)) == 2 and "measured 0.97 against a threshold of 0.9" in report


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_client_with_nothing_to_draw_gets_sentences(
    engine: AsyncEngine, console: httpx.AsyncClient
) -> None:
    await SqlKeyStore(engine, SECRET).create("fresh", "default", None)  # known, never scored
    page = (await console.get("/console/client", params={"name": "fresh"})).text
    assert svg_parts(page) == []
    assert "No risk recorded for this client in the last 24 hours" in page
    assert "No query map: the detector draws one" in page
    assert "detection.reference_file" in page
