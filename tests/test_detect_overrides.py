"""Operator pins under concurrency, on both databases: two pins for one client at once (a
double-submitted form, the console and the admin API together) both succeed, and the
override that stays is the one the published level follows. A console action whose
store fails answers the problem page, not a 500."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.config import ConsoleConfig, DetectionConfig
from modelfence.console import create_console
from modelfence.console.data import ConsoleData
from modelfence.detect.actions import Policy
from modelfence.detect.overrides import OperatorActions, OverrideAction, Pinned
from modelfence.detect.state import SqlState
from modelfence.forensics.service import Forensics
from modelfence.store import create_tables, open_engine, transaction
from modelfence.store.schema import detection_audit
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.keys import WatermarkKeyring

from .test_admin_api import SECRET, TOKEN
from .test_auth_failures import admin_failures
from .test_console_pages import record
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

PAIRS = 20
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


async def _agrees(state: SqlState, policy: Policy, client: str) -> tuple[str | None, str]:
    """The override in force and the published level, checked to agree."""
    override = (await state.overrides()).get(client)
    published = await state.get(client)
    assert published is not None
    expected = policy.decide(client, published.risk, published.tier, override)  # type: ignore[arg-type]
    assert published.level == expected, (override, published.level)
    return override, published.level


async def test_concurrent_pins_of_one_client_all_succeed_and_agree(engine: AsyncEngine) -> None:
    state = SqlState(engine)
    policy = Policy(DetectionConfig())
    console = OperatorActions(state, policy)
    api = OperatorActions(state, policy)  # another surface, the same code path
    await state.publish([record("thief", 0.1), record("twin", 0.1)])
    outcomes: set[tuple[str | None, str]] = set()
    for i in range(PAIRS):
        first: OverrideAction = "block"
        second: OverrideAction = "clear" if i % 2 else "block"
        pins = await asyncio.gather(
            console.pin("thief", first, f"double submit {i}"),
            api.pin("thief", second, f"double submit {i}"),
        )
        assert all(isinstance(p, Pinned) for p in pins)
        outcomes.add(await _agrees(state, policy, "thief"))
        # Identical pins of a client nobody pinned before: the override row is new to both.
        await asyncio.gather(*(api.pin(f"new-{i}", "block", "x") for _ in range(2)))
        assert await _agrees(state, policy, f"new-{i}") == ("block", "block")
    assert outcomes <= {("block", "block"), (None, "normal")}
    await _agrees(state, policy, "twin")  # untouched
    async with transaction(engine) as conn:
        audited = (
            await conn.execute(
                select(func.count()).where(detection_audit.c.client == "thief")
            )
        ).scalar_one()
    assert audited == 2 * PAIRS


async def test_an_action_the_store_refuses_shows_the_problem_page(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    state = SqlState(engine)
    # A real failure of the database the actions write to: a file that cannot be opened.
    unreachable = open_engine(f"sqlite:///{tmp_path / 'missing' / 'state.db'}")
    console = create_console(
        data=ConsoleData(state),
        actions=OperatorActions(SqlState(unreachable), Policy(DetectionConfig())),
        forensics=Forensics(engine, WatermarkKeyring(SECRET), WatermarkConfig()),
        admin_token=TOKEN,
        failures=admin_failures(),
        settings=ConsoleConfig(),
    )
    app = Starlette(routes=[Mount("/console", app=console)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        assert (await client.post("/console/login", data={"token": TOKEN})).status_code == 303
        match = CSRF.search((await client.get("/console/")).text)
        assert match is not None
        done = await client.post(
            "/console/act",
            data={"csrf": match.group(1), "client": "thief", "action": "block", "reason": "x"},
        )
    assert done.status_code == 503
    await unreachable.dispose()
    assert "Error 503" in done.text and "state database" in done.text
