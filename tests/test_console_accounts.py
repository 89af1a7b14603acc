"""The account page: an account as the operator registered it, against a real ``modelfence
serve`` (trust as the admin API reports it, traits as shortened keyed hashes, every key
without the key or its hash, the clients with risk and level, accounts sharing a trait,
requests per hour across the account), links to it, hostile ids and parameters; and its
reads on both databases."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.config import AccountsConfig, ConsoleConfig, DetectionConfig
from modelfence.console import AccountSource, create_console
from modelfence.console.accounts import AccountData
from modelfence.console.data import ConsoleData
from modelfence.detect.actions import Policy
from modelfence.detect.overrides import OperatorActions
from modelfence.detect.state import ClientRecord, SqlState
from modelfence.forensics.service import Forensics
from modelfence.identity import ServerSecret, SqlKeyStore
from modelfence.identity.base import AccountMetadata
from modelfence.identity.trust import TrustPolicy
from modelfence.store import create_tables, open_engine, transaction
from modelfence.store.schema import account_traits, request_events
from modelfence.testing.processes import GatewayProcess, http_json
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.keys import WatermarkKeyring

from .conftest import GatewayFactory
from .console_client import ConsoleClient, location
from .test_admin_api import SECRET, TOKEN
from .test_auth_failures import admin_failures
from .test_console_browser import log_in, page  # noqa: F401  (page: a fixture, Chromium)
from .test_console_pages import CHAT, HOSTILE_NAMES, record
from .test_store_database import scratch_engine, store_url  # noqa: F401  (store_url: fixture)

ACME = {"organisation": "Acme  Widgets Ltd", "payment": "card_fp_4242424242",
        "email_domain": "ops@acme-widgets.example", "signup_address": "203.0.113.77",
        "verified": True, "paid_usd": 1234.5, "created_at": "2026-01-05T09:00:00Z"}
SECRET_VALUES = ["acme widgets", "card_fp_4242424242", "acme-widgets.example",
                 "203.0.113"]


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> GatewayProcess:
    return start_gateway(detection={"enabled": False}, telemetry={"batch_size": 1})


@pytest.fixture
def browser(gateway: GatewayProcess) -> Iterator[ConsoleClient]:
    client = ConsoleClient(gateway)
    assert location(client.login()) == "/console/"
    yield client
    client.close()


@pytest.fixture
async def state(gateway: GatewayProcess, tmp_path: Path) -> AsyncIterator[SqlState]:
    """The gateway's own state database, opened by the test as another process would."""
    engine = open_engine(f"sqlite:///{tmp_path / 'state.db'}")
    yield SqlState(engine)
    await engine.dispose()


def publish(workdir: Path, *records: ClientRecord) -> None:
    """Verdicts into the gateway's state database, from a test that is not async."""

    async def write() -> None:
        engine = open_engine(f"sqlite:///{workdir / 'state.db'}")
        try:
            await SqlState(engine).publish(list(records))
        finally:
            await engine.dispose()

    with ThreadPoolExecutor(1) as pool:  # a loop of its own, beside Playwright's
        pool.submit(asyncio.run, write()).result()


def put_account(gateway: GatewayProcess, account: str, fields: dict[str, Any]) -> dict[str, Any]:
    status, body = http_json("PUT", f"{gateway.url}/admin/v1/accounts/{quote(account, safe='')}",
                             fields, token=gateway.admin_token)
    assert status == 200, body
    return dict(body)


def chat(gateway: GatewayProcess, key: str) -> int:
    return http_json("POST", gateway.url + "/v1/chat/completions", CHAT, token=key)[0]


async def test_the_account_page_shows_trust_traits_keys_clients_kin_and_traffic(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient
) -> None:
    acme = put_account(gateway, "acme", ACME)
    put_account(gateway, "shell-co", {"payment": "card_fp_4242424242",
                                      "email_domain": "shell.example"})
    put_account(gateway, "look-alike", {"organisation": "ACME widgets ltd"})  # unverified
    put_account(gateway, "stranger", {"payment": "card_fp_0000", "email_domain": "else.example"})
    web = gateway.create_key("acme-web", account="acme")
    batch = gateway.create_key("acme-batch", "tiny", account="acme")
    outsider = gateway.create_key("outsider")
    gateway.create_key("shell-client", account="shell-co")
    for key, times in ((web, 3), (batch, 1), (outsider, 2)):
        for _ in range(times):
            assert chat(gateway, key) == 200
    await state.publish([record("acme-web", 0.71, level="tighten"), record("outsider", 0.9)])
    _, listed = http_json("GET", gateway.url + "/admin/v1/accounts/acme", token=gateway.admin_token)
    [revoked] = [k["key_id"] for k in listed["keys"] if k["client"] == "acme-batch"]
    gateway.revoke_key(revoked)

    deadline = time.monotonic() + 10
    shown = browser.get("/account", id="acme")
    while "4 requests" not in shown.text and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # telemetry is written off the request path
        shown = browser.get("/account", id="acme")
    assert shown.status_code == 200, shown.text[:300]
    text = shown.text
    assert "Account acme" in text and "4 requests (0 refused)" in text  # not the outsider's 2
    # Trust: what GET /admin/v1/accounts/acme says, by the same TrustPolicy.assess.
    trust = acme["trust"]
    assert f"<strong>{trust['level']}</strong>" in text and trust["reason"] in text
    assert "Verified</dt><dd>yes" in text and "1,234.50 USD" in text
    assert "2026-01-05 09:00:00 UTC" in text
    # Traits: present, shortened keyed hashes; never a value, never a whole hash.
    for name, keyed in acme["traits"].items():
        assert f"<code>{keyed[:8]}…</code>" in text, name
        assert keyed[:9] not in text and keyed not in text
    assert not [value for value in SECRET_VALUES if value.lower() in text.lower()]
    # Keys: id, the first characters, tier, state; never the key or its hash.
    secret = ServerSecret(gateway.config["secret"].encode())
    for key in (web, batch):
        assert key[:8] in text and key[:12] not in text
        assert secret.hash_api_key(key) not in text and secret.hash_api_key(key)[:16] not in text
    assert f"<code>{revoked}</code>" in text and "revoked 20" in text and ">tiny<" in text
    assert outsider[:8] not in text
    # Clients, with risk and level, linked to their pages.
    assert '<a href="/console/client?name=acme-web">acme-web</a>' in text
    assert '<a href="/console/client?name=acme-batch">acme-batch</a>' in text
    assert "0.71" in text and "level-tighten" in text and "not scored yet" in text
    assert "/console/client?name=outsider" not in text
    # Accounts sharing a trait: the linking evidence, each linked to its page.
    assert '<a href="/console/account?id=shell-co">shell-co</a>' in text
    assert "payment: their accounts share a payment instrument" in text
    assert '<a href="/console/account?id=look-alike">look-alike</a>' in text
    assert "not verified on both: detection does not link on it" in text
    assert "stranger" not in text

    shell = browser.get("/account", id="shell-co").text
    assert '<a href="/console/account?id=acme">acme</a>' in shell and "probation" in shell
    assert "look-alike" not in shell  # shares the organisation with acme only
    bare = put_account(gateway, "bare", {})
    bare_page = browser.get("/account", id="bare").text
    assert "no other account shares a trait" in bare_page and "No keys." in bare_page
    assert "Probation widens" in bare_page and bare["trust"]["level"] == "probation"


async def test_account_ids_are_links_wherever_they_are_shown(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient
) -> None:
    gateway.create_key("acme-web", account="acme")
    await state.publish([record("acme-web", 0.2)])
    link = '<a href="/console/account?id=acme">acme</a>'
    assert link in browser.get("/client", name="acme-web").text  # the keys table
    assert link in browser.get("/report", name="acme-web").text
    assert link in browser.get("/clients").text  # the account column


def test_unknown_accounts_are_a_404_and_bad_parameters_a_400_naming_them(
    gateway: GatewayProcess, browser: ConsoleClient
) -> None:
    gateway.create_key("acme-web", account="acme")
    missing = browser.get("/account", id="nobody")
    assert missing.status_code == 404 and "No account with id &#39;nobody&#39;" in missing.text
    # A client's name is not an account.
    assert browser.get("/account", id="acme-web").status_code == 404
    for path, param in [
        ("/account", "id"),
        ("/account?id=", "id"),
        ("/account?id=" + "a" * 201, "id"),
        ("/account?id=%00", "id"),
        ("/account?id=acme&id=acme", "id"),
        ("/account?id=acme&name=acme", "name"),
        ("/account?id=%3Cscript%3Ealert(1)%3C/script%3E&x=1", "x"),
    ]:
        response = browser.http.get("/console" + path)
        assert response.status_code == 400, (path, response.text[:300])
        assert f"{param}: " in response.text and "<script>" not in response.text
    stranger = ConsoleClient(gateway)
    try:
        assert location(stranger.get("/account", id="acme")) == "/console/login"
    finally:
        stranger.close()


async def test_hostile_account_ids_are_escaped_on_every_page(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient
) -> None:
    for i, account in enumerate(HOSTILE_NAMES):
        gateway.create_key(f"client-{i}", account=account)
    await state.publish([record(f"client-{i}", 0.5) for i in range(len(HOSTILE_NAMES))])
    listing = browser.get("/clients", per_page=200).text
    assert "<script>alert(1)" not in listing and 'href="javascript:' not in listing
    for i, account in enumerate(HOSTILE_NAMES):
        shown = browser.get("/account", id=account)
        assert shown.status_code == 200, (account, shown.text[:300])
        assert "<script>alert(1)" not in shown.text and 'href="javascript:' not in shown.text
        assert f'href="/console/account?id={quote(account)}"' in listing, account
        assert f"/console/client?name=client-{i}" in shown.text
        client_page = browser.get("/client", name=f"client-{i}").text
        assert f'href="/console/account?id={quote(account)}"' in client_page


async def test_the_account_reads_on_both_databases(
    store_url: str,  # noqa: F811
) -> None:
    """Kin sharing a trait's keyed hash, traffic across the account's keys only."""
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        await _account_reads(engine)


async def _account_reads(engine: AsyncEngine) -> None:
    secret = ServerSecret(b"test-secret-0123456789abcdef")
    store = SqlKeyStore(engine, secret)
    await store.put_account("a", AccountMetadata(payment="card-1", email_domain="a.example",
                                                 signup_address="198.51.100.9"))
    await store.put_account("b", AccountMetadata(payment="card-1"))
    await store.put_account("c", AccountMetadata(email_domain="x@A.example"))  # normalised alike
    await store.put_account("d", AccountMetadata(payment="card-2", email_domain="d.example"))
    await store.put_account("e", AccountMetadata(signup_address="198.51.100.200"))  # same /24
    mine, _ = await store.create("shared-client", "default", "a")
    theirs, _ = await store.create("shared-client", "default", "d")  # one client, two accounts
    now = datetime.now(UTC)
    events = [(mine.key_id, 1, 200), (mine.key_id, 3, 429), (theirs.key_id, 1, 200),
              (mine.key_id, 30, 200)]  # the last is older than a day
    async with transaction(engine, write=True) as conn:
        await conn.execute(request_events.insert(), [
            {"ts": now - timedelta(hours=hours), "request_id": f"r{i}", "client": "shared-client",
             "key_id": key_id, "tier": "default", "route": "chat", "model": "m",
             "status": status, "ip_prefix": "p", "fingerprint": "f", "prompt_hash": "h",
             "prompt_len": 1, "tokens_in": 10, "tokens_out": 5, "latency_ms": 1.0,
             "limit_decision": "ok", "risk_level": "normal", "detail": {}}
            for i, (key_id, hours, status) in enumerate(events)
        ])
    trust = TrustPolicy(AccountsConfig(), NoCachedAccounts())
    data = AccountData(engine, AccountSource(
        read=store.get_account, standing=lambda r: trust.assess(r, "normal", time.time())))
    view = await data.account("a")
    assert view is not None
    assert [(k.account, k.shared) for k in view.kin] == [
        ("b", ("payment",)), ("c", ("email_domain",)), ("e", ("signup_network",))]
    assert [t.name for t in view.traits if t.short_hash] == [
        "payment", "signup_network", "email_domain"]
    assert [k.key_id for k in view.keys] == [mine.key_id] and view.key_count == 1
    assert [(c.client, c.risk) for c in view.clients] == [("shared-client", None)]
    assert sum(h.requests for h in view.timeline) == 2  # not d's key, not 30 hours ago
    assert sum(h.refused for h in view.timeline) == 1
    assert view.standing.level == "probation" and view.standing.widens_at is not None
    assert await data.account("nobody") is None
    lone = await data.account("d")
    assert lone is not None and lone.kin == [] and sum(h.requests for h in lone.timeline) == 1


async def test_kin_follow_changed_traits_and_an_older_database_is_filled_in(
    store_url: str,  # noqa: F811
) -> None:
    """Kin come from ``account_traits``: a database made before it gets the registered
    accounts' traits at start-up, and a changed trait moves the account to its new kin."""
    async with scratch_engine(store_url) as engine:
        await create_tables(engine)
        store = SqlKeyStore(engine, ServerSecret(b"test-secret-0123456789abcdef"))
        await store.put_account("a", AccountMetadata(payment="card-1"))
        await store.put_account("b", AccountMetadata(payment="card-1", email_domain="b.example"))
        await store.put_account("c", AccountMetadata(payment="card-2"))
        async with transaction(engine, write=True) as conn:
            await conn.run_sync(lambda sync: account_traits.drop(sync))
        await create_tables(engine)  # a gateway of this version starting on the older database
        trust = TrustPolicy(AccountsConfig(), NoCachedAccounts())
        data = AccountData(engine, AccountSource(
            read=store.get_account, standing=lambda r: trust.assess(r, "normal", time.time())))

        async def kin(account: str) -> list[tuple[str, tuple[str, ...]]]:
            view = await data.account(account)
            assert view is not None
            return [(k.account, k.shared) for k in view.kin]

        assert await kin("a") == [("b", ("payment",))]
        await store.put_account("b", AccountMetadata(payment="card-2"))  # a new card
        assert await kin("a") == []
        assert await kin("c") == [("b", ("payment",))]


class NoCachedAccounts:
    """Stands in for the KeyRegistry's cache, which ``assess`` never asks."""

    def account(self, account_id: str) -> None:
        return None


def test_in_a_browser_the_analyst_follows_an_account_to_its_kin(
    gateway: GatewayProcess, page: Any, tmp_path: Path  # noqa: F811
) -> None:
    """From a client's keys to its account, and on to an account sharing its card (Chromium).

    The screenshot goes where the browser test's go (``$MODELFENCE_CONSOLE_SCREENSHOTS``)."""
    shots = Path(os.environ.get("MODELFENCE_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    put_account(gateway, "throwaway-ltd", {"payment": "card_fp_77", "email_domain": "mail.example",
                                           "signup_address": "198.51.100.23"})
    put_account(gateway, "spare-ltd", {"payment": "card_fp_77", "signup_address": "198.51.100.40"})
    thief = gateway.create_key("thief", account="throwaway-ltd")
    gateway.create_key("thief-2", account="throwaway-ltd")
    gateway.create_key("spare", account="spare-ltd")
    for _ in range(5):
        assert chat(gateway, thief) == 200
    publish(tmp_path, record("thief", 0.64, level="tighten", reasons=[
        {"code": "llm_harvesting", "text": "share 0.9 > 0.5", "score": 0.8}]))
    console = log_in(page, gateway)
    page.goto(console + "/client?name=thief")
    page.get_by_role("link", name="throwaway-ltd").first.click()
    page.wait_for_url(console + "/account?id=throwaway-ltd")
    assert page.get_by_role("heading", level=1).inner_text() == "Account throwaway-ltd"
    deadline = time.monotonic() + 10
    while "5 requests" not in page.content() and time.monotonic() < deadline:
        time.sleep(0.2)  # telemetry is written off the request path
        page.reload()
    page.screenshot(path=shots / "console-account.png", full_page=True)
    page.get_by_role("link", name="spare-ltd").click()
    page.wait_for_url(console + "/account?id=spare-ltd")
    assert page.get_by_role("link", name="spare", exact=True).count() == 2  # clients, keys


async def test_an_account_read_the_database_fails_is_a_503_page(tmp_path: Path) -> None:
    """Logged in, then the account's record cannot be read: a 503 page, not a 500."""
    engine = open_engine(f"sqlite:///{tmp_path / 'state.db'}")
    unreachable = open_engine(f"sqlite:///{tmp_path / 'missing' / 'state.db'}")
    try:
        await create_tables(engine)
        state = SqlState(engine)
        keys = SqlKeyStore(unreachable, SECRET)  # a real failure: a file that cannot be opened
        console = create_console(
            data=ConsoleData(state),
            actions=OperatorActions(state, Policy(DetectionConfig())),
            forensics=Forensics(engine, WatermarkKeyring(SECRET), WatermarkConfig()),
            admin_token=TOKEN,
            failures=admin_failures(),
            settings=ConsoleConfig(),
            accounts=AccountSource(read=keys.get_account,
                                   standing=lambda r: pytest.fail("never assessed")),
        )
        app = Starlette(routes=[Mount("/console", app=console)])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            assert (await client.post("/console/login", data={"token": TOKEN})).status_code == 303
            failed = await client.get("/console/account", params={"id": "acme"})
    finally:
        await unreachable.dispose()
        await engine.dispose()
    assert failed.status_code == 503 and failed.headers["retry-after"] == "5"
    assert "Error 503" in failed.text and "state database did not answer" in failed.text
    # The failure may follow a write (a POST's action): the page never claims nothing changed.
    assert "may not have been done" in failed.text and "nothing was changed" not in failed.text
    assert "Log out" in failed.text  # the console's own page, the session intact
    assert "missing" not in failed.text and "sqlite" not in failed.text.lower()
