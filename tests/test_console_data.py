"""The console's reads on both databases: filters (the reason filter reads JSON as text),
level order, keys without secrets, overview counts, acknowledgement; and the cookie's
``Secure`` over https (in process: the test gateways serve plain http)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.config import ConsoleConfig, DetectionConfig
from modelfence.console import create_console
from modelfence.console.data import ClientFilter, ConsoleData
from modelfence.detect.actions import Policy
from modelfence.detect.alerts import Alerter
from modelfence.detect.overrides import OperatorActions
from modelfence.detect.state import SqlState
from modelfence.forensics.service import Forensics
from modelfence.identity import SqlKeyStore
from modelfence.store import create_tables
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.keys import WatermarkKeyring

from .test_admin_api import SECRET, TOKEN
from .test_auth_failures import admin_failures
from .test_console_pages import record
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        yield engine


async def test_filters_sorting_and_keys_read_the_same_on_both_databases(
    engine: AsyncEngine,
) -> None:
    state = SqlState(engine)
    timing = [{"code": "machine_timing", "text": "regularity 0.95 > 0.9", "score": 0.5}]
    await state.publish([
        record("a", 0.95, level="block", reasons=timing),
        record("b", 0.40, level="alert", tier="tiny", reasons=[
            {"code": "machine_timing_extra", "text": "a longer code", "score": 0.4}]),
        record("c_x", 0.10),
        record("cdx", 0.05, entity="ent_9"),
    ])
    keys = SqlKeyStore(engine, SECRET)
    _, secret = await keys.create("b", "tiny", "acme")
    data = ConsoleData(state, telemetry_drops=lambda: 3)

    async def names(where: ClientFilter | None = None, **order: object) -> list[str]:
        options = {"sort": "risk", "descending": True, "page": 1, "per_page": 10, **order}
        page = await data.clients(where or ClientFilter(), **options)  # type: ignore[arg-type]
        return [row.record.client for row in page.rows]

    assert await names() == ["a", "b", "c_x", "cdx"]
    assert await names(sort="level", descending=True) == ["a", "b", "c_x", "cdx"]
    assert await names(ClientFilter(reason="machine_timing")) == ["a"]  # not machine_timing_extra
    assert await names(ClientFilter(account="acme")) == ["b"]
    assert await names(ClientFilter(tier="tiny")) == ["b"]
    assert await names(ClientFilter(entity="ent_9")) == ["cdx"]
    assert await names(ClientFilter(search="c_")) == ["c_x"]  # "_" is no wildcard
    page = await data.clients(ClientFilter(), sort="client", descending=False, page=2, per_page=3)
    assert [r.record.client for r in page.rows] == ["cdx"] and page.total == 4 and page.pages == 2
    b = (await data.clients(ClientFilter(account="acme"), sort="risk", descending=True, page=1,
                            per_page=1)).rows[0]
    assert b.accounts == ("acme",) and b.override is None

    view = await data.client("b")
    assert view is not None and [k.account for k in view.keys] == ["acme"]
    assert secret not in repr(view)
    assert await data.client("nobody") is None

    overview = await data.overview()
    assert overview.levels == {"block": 1, "alert": 1, "normal": 2}
    assert overview.telemetry_drops == 3 and overview.requests_day == 0


async def test_an_alert_is_acknowledged_once(engine: AsyncEngine) -> None:
    state = SqlState(engine)
    alerter = Alerter(engine, webhook_url=None, public_url="http://gw", dedup_seconds=0)
    await alerter.alert(record("m", 0.5, level="alert"), time.time())
    data = ConsoleData(state)
    [alert] = (await data.alerts(page=1, per_page=10)).rows
    assert alert.acknowledged_at is None and (await data.overview()).unacknowledged == 1
    first = await data.acknowledge(alert.id)
    assert first is not None and first.acknowledged_at is not None
    assert datetime.now(UTC) - first.acknowledged_at < timedelta(minutes=1)
    again = await data.acknowledge(alert.id)
    assert again is not None and again.acknowledged_at == first.acknowledged_at
    assert await data.acknowledge(alert.id + 1) is None
    assert (await data.overview()).unacknowledged == 0


async def test_the_session_cookie_is_secure_over_https(engine: AsyncEngine) -> None:
    """Also: with no account source wired, the account page says what it lacks (it does
    not claim the account is unknown)."""
    state = SqlState(engine)
    console = create_console(
        data=ConsoleData(state),
        actions=OperatorActions(state, Policy(DetectionConfig())),
        forensics=Forensics(engine, WatermarkKeyring(SECRET), WatermarkConfig()),
        admin_token=TOKEN,
        failures=admin_failures(),
        settings=ConsoleConfig(),
    )
    app = Starlette(routes=[Mount("/console", app=console)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://gw") as client:
        login = await client.post("/console/login", data={"token": TOKEN})
        unwired = await client.get("/console/account", params={"id": "acme"})
    assert login.status_code == 303
    assert unwired.status_code == 404 and "need the gateway&#39;s key store" in unwired.text
    assert "No account with id" not in unwired.text
    cookie = login.headers["set-cookie"].lower()
    assert "; secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
