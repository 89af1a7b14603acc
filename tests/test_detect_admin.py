"""Detection's admin routes: token required, bad input refused, overrides applied and audited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.admin import create_admin_app
from modelfence.admin.detection import detection_router
from modelfence.config import DetectionConfig
from modelfence.detect.actions import Policy
from modelfence.detect.overrides import OperatorActions
from modelfence.detect.state import SqlState
from modelfence.identity import SqlKeyStore
from modelfence.store import create_tables

from .test_admin_api import AUTH, SECRET, TIERS, TOKEN, error_of
from .test_auth_failures import admin_failures
from .test_detect_service import service
from .test_detect_streams import benign_chat, harvester
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

ROUTES = [
    ("GET", "/admin/v1/clients", None),
    ("GET", "/admin/v1/clients/acme", None),
    ("GET", "/admin/v1/entities/ent_1", None),
    ("GET", "/admin/v1/alerts", None),
    ("POST", "/admin/v1/clients/acme/action", {"action": "block"}),
]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield engine


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    state = SqlState(engine)
    admin = create_admin_app(
        store=SqlKeyStore(engine, SECRET),
        admin_token=TOKEN,
        tiers=TIERS,
        failures=admin_failures(1000),
        routers=[detection_router(state, OperatorActions(state, Policy(DetectionConfig())))],
    )
    app = Starlette(routes=[Mount("/admin", app=admin)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_detection_route_needs_the_admin_token(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status_code == 401 and error_of(response)["code"] == "missing_admin_token"
    wrong = await client.request(method, path, json=body, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", "/admin/v1/clients/acme/action", {"action": "nuke"}, "action"),
        ("POST", "/admin/v1/clients/acme/action", {"action": "block", "extra": 1}, "extra"),
        ("POST", "/admin/v1/clients/acme/action", {}, "action"),
        ("POST", "/admin/v1/clients/acme/action", {"action": 3}, "action"),
        ("GET", "/admin/v1/clients?min_risk=2", None, "min_risk"),
        ("GET", "/admin/v1/alerts?limit=0", None, "limit"),
    ],
)
async def test_bad_input_is_a_422_naming_the_parameter(
    client: httpx.AsyncClient, method: str, path: str, body: Any, param: str
) -> None:
    response = await client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 422
    assert error_of(response)["param"] == param


async def test_unknown_clients_and_entities_are_404(client: httpx.AsyncClient) -> None:
    for path, code in (
        ("/admin/v1/clients/nobody", "client_not_found"),
        ("/admin/v1/entities/ent_x", "entity_not_found"),
    ):
        response = await client.get(path, headers=AUTH)
        assert response.status_code == 404 and error_of(response)["code"] == code


async def test_flagged_clients_alerts_and_a_manual_override(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    detector = service(engine, [])
    events = harvester("thief", 120, seed=1)
    for i in range(0, 120, 20):
        await detector.handle(events[i : i + 20])
    listed = (await client.get("/admin/v1/clients?min_risk=0.5", headers=AUTH)).json()["data"]
    assert [c["client"] for c in listed] == ["thief"] and listed[0]["level"] == "block"
    alerts = (await client.get("/admin/v1/alerts", headers=AUTH)).json()["data"]
    assert alerts and alerts[0]["client"] == "thief"

    allowed = await client.post(
        "/admin/v1/clients/thief/action",
        headers=AUTH,
        json={"action": "allow", "note": "pen-test partner"},
    )
    assert allowed.status_code == 200 and allowed.json() == {
        "client": "thief",
        "override": "allow",
        "level": "normal",
    }
    assert "thief" not in await SqlState(engine).actions()
    detail = (await client.get("/admin/v1/clients/thief", headers=AUTH)).json()
    assert detail["override"] == "allow" and detail["record"]["level"] == "normal"
    assert (
        detail["audit"][0]["source"] == "admin"
        and detail["audit"][0]["reasons"][0]["text"] == "pen-test partner"
    )

    # The detector respects the pin on its next batches.
    detector.engine.overrides = await SqlState(engine).overrides()
    await detector.handle(harvester("thief", 20, seed=2, start=1000.0))
    assert "thief" not in await SqlState(engine).actions()

    cleared = await client.post(
        "/admin/v1/clients/thief/action", headers=AUTH, json={"action": "clear"}
    )
    assert cleared.json()["level"] == "block"
    assert (await SqlState(engine).actions())["thief"].blocks


async def test_a_client_never_seen_can_be_blocked_ahead(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    response = await client.post(
        "/admin/v1/clients/mallory/action", headers=AUTH, json={"action": "block"}
    )
    assert response.status_code == 200
    assert (await SqlState(engine).actions())["mallory"].blocks
    detail = (await client.get("/admin/v1/clients/mallory", headers=AUTH)).json()
    assert detail["override"] == "block"


async def test_a_link_cut_through_the_admin_api_stays_cut(
    client: httpx.AsyncClient, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelfence.detect.service.OVERRIDE_REFRESH_SECONDS", 0.0)
    machine = {"fingerprint": "one-machine", "ip_prefix": "198.51.100.0/24"}
    detector = service(engine, [])

    async def traffic(start: float) -> None:
        events = sorted(
            benign_chat("office", 40, seed=3, start=start, **machine)
            + harvester("thief", 60, seed=1, start=start + 5, **machine),
            key=lambda e: e.ts,
        )
        for i in range(0, len(events), 20):
            await detector.handle(events[i : i + 20])

    await traffic(0.0)
    office = (await client.get("/admin/v1/clients/office", headers=AUTH)).json()["record"]
    thief = (await client.get("/admin/v1/clients/thief", headers=AUTH)).json()["record"]
    assert office["entity"] == thief["entity"] is not None
    link = next(link for link in office["links"] if link["other"] == "thief")
    assert link["kinds"] == ["fingerprint", "ip_prefix"] and link["weight"] > 0.9
    assert not link["cut"]

    cut = await client.put(
        "/admin/v1/clients/office/links/thief/cut", headers=AUTH, json={"note": "our own QA"}
    )
    assert cut.status_code == 200 and cut.json() == {"client": "office", "other": "thief", "cut": True}
    await traffic(1000.0)
    detector = service(engine, [])  # a restarted detector reads the cut too
    await traffic(2000.0)
    office = (await client.get("/admin/v1/clients/office", headers=AUTH)).json()
    thief = (await client.get("/admin/v1/clients/thief", headers=AUTH)).json()["record"]
    assert office["record"]["entity"] is None and thief["entity"] is None  # each on its own
    assert thief["level"] == "block" and office["record"]["level"] == "normal"
    assert next(link for link in office["record"]["links"] if link["other"] == "thief")["cut"]
    assert office["audit"][0]["action"] == "cut_link"
    assert "our own QA" in office["audit"][0]["reasons"][0]["text"]

    restored = await client.delete("/admin/v1/clients/thief/links/office/cut", headers=AUTH)
    assert restored.json()["cut"] is False
    await traffic(3000.0)
    office = (await client.get("/admin/v1/clients/office", headers=AUTH)).json()["record"]
    thief = (await client.get("/admin/v1/clients/thief", headers=AUTH)).json()["record"]
    assert office["entity"] == thief["entity"] is not None
    same = await client.put("/admin/v1/clients/office/links/office/cut", headers=AUTH, json={})
    assert same.status_code == 422 and error_of(same)["param"] == "other"


async def test_accounts_sharing_a_payment_instrument_are_one_entity(store_url: str) -> None:  # noqa: F811
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        await _linked_by_payment(engine)


async def _linked_by_payment(engine: AsyncEngine) -> None:
    from modelfence.identity.base import AccountMetadata

    store = SqlKeyStore(engine, SECRET)
    for account in ("acct-a", "acct-b"):
        await store.put_account(account, AccountMetadata(payment="card-9911"))
    await store.put_account("acct-c", AccountMetadata(payment="card-0000"))
    detector = service(engine, [])
    events = sorted(
        harvester("a-key", 30, seed=1, account="acct-a", ip_prefix="10.1.0.0/24", fingerprint="a")
        + harvester("b-key", 30, seed=2, start=1000, account="acct-b", ip_prefix="10.2.0.0/24",
                    fingerprint="b")
        + harvester("c-key", 30, seed=3, start=2000, account="acct-c", ip_prefix="10.3.0.0/24",
                    fingerprint="c"),
        key=lambda e: e.ts,
    )
    for i in range(0, len(events), 10):
        await detector.handle(events[i : i + 10])
    state = SqlState(engine)
    a, b, c = [await state.get(name) for name in ("a-key", "b-key", "c-key")]
    assert a is not None and b is not None and c is not None
    assert a.entity is not None and a.entity == b.entity and c.entity != a.entity
    assert a.links is not None and a.links[0]["other"] == "b-key"
    assert a.links[0]["kinds"] == ["payment"]
