"""The operator's ``shadow`` and ``probation`` pins, through the admin API and the console's
Act form, against real gateway processes: one with its detector child on SQLite, and two
replicas sharing Redis and PostgreSQL (in shadow mode too). A shadowed harvester is scored,
alerted and served until the pin is cleared; a client on probation meets the probation
allowance whatever its account, while a client of the same tier is served."""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.config import DetectionConfig
from modelfence.detect.actions import Action, Policy
from modelfence.detect.overrides import OperatorActions
from modelfence.detect.state import ACTIONS_KEY, PinnedState, RedisState, SqlState
from modelfence.store import create_tables, transaction
from modelfence.store.schema import detection_alerts, detection_audit
from modelfence.testing.processes import GatewayProcess, http_json

from .conftest import GatewayFactory
from .console_client import CSRF, ConsoleClient, location
from .services import private_redis
from .test_console_pages import record
from .test_detect_service import service
from .test_detect_streams import harvester
from .test_gateway_accounts import ALLOWANCES, account_id, embed
from .test_store_database import scratch_engine

DETECTION = {"embedder": "hashing", "evaluate_every": 5, "state_poll_seconds": 0.2}
HARVEST = {"temperature": 0, "logprobs": True, "top_logprobs": 5, "max_tokens": 5,
           "fake_chunks": 5}
WORDS = ["oven", "museum", "python", "flight", "garlic", "visa", "loop", "bread", "ticket",
         "class"]
ALERT = re.compile(r'role="alert">([^<]*)')
VERIFIED = {"verified": True, "organisation": "Acme"}


def pin(gateway: GatewayProcess, client: str, action: Any, note: str = "") -> tuple[int, Any]:
    return http_json("POST", f"{gateway.url}/admin/v1/clients/{client}/action",
                     {"action": action, "note": note}, token=gateway.admin_token)


def detail(gateway: GatewayProcess, client: str) -> dict[str, Any]:
    status, body = http_json("GET", f"{gateway.url}/admin/v1/clients/{client}",
                             token=gateway.admin_token)
    assert status == 200, body
    return dict(body)


def harvest(gateway: GatewayProcess, key: str, rng: random.Random) -> int:
    prompt = f"Explain step by step: {' '.join(rng.sample(WORDS, 5))}"
    status, _ = http_json(
        "POST", gateway.url + "/v1/chat/completions",
        {"model": "fake-chat", "messages": [{"role": "user", "content": prompt}], **HARVEST},
        token=key,
    )
    return status


def until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def refused_on_probation(gateway: GatewayProcess, key: str) -> tuple[dict[str, str], str]:
    """Embed 4 texts at a time until the gateway refuses (the pin reaches it at its next
    state poll); the refusal's headers and message, checked to be ``probation_limit``."""
    deadline = time.monotonic() + 10
    while True:
        status, headers, body = embed(gateway, key, 4)
        if status == 429:
            assert body["error"]["code"] == "probation_limit", body
            return headers, body["error"]["message"]
        assert status == 200, body
        assert time.monotonic() < deadline, "the probation never reached the gateway"
        time.sleep(0.05)


# --- shadow ------------------------------------------------------------------------------


def test_a_shadowed_harvester_is_scored_alerted_and_served_until_cleared(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(detection=DETECTION, telemetry={"batch_size": 50})
    thief = gateway.create_key("thief")
    # Before its first request: the detector reads the pin with its first batch.
    status, body = pin(gateway, "thief", "shadow", "watch before acting, ticket 12")
    assert status == 200 and body == {"client": "thief", "override": "shadow", "level": "normal"}

    rng = random.Random(7)
    statuses: list[int] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        statuses.append(harvest(gateway, thief, rng))
        if len(statuses) % 10 == 0 and (detail(gateway, "thief")["record"] or {}).get(
            "level"
        ) == "block":
            break
    seen = detail(gateway, "thief")
    assert seen["record"]["level"] == "block", f"never scored to block in {len(statuses)}"
    assert set(statuses) == {200}  # served all along: nothing applied
    assert seen["override"] == "shadow" and seen["record"]["shadow"] is True
    assert seen["record"]["action"] == {"level": "normal", "quota_share": 1.0, "probation": False}
    assert any(r["code"] == "llm_harvesting" for r in seen["record"]["reasons"])
    climbs = [row for row in seen["audit"] if row["source"] == "detector"]
    assert climbs and climbs[0]["action"] == "block" and all(row["shadow"] for row in climbs)
    operator = [row for row in seen["audit"] if row["source"] == "admin"]
    assert operator[-1]["action"] == "shadow"
    assert operator[-1]["reasons"][0]["text"] == "watch before acting, ticket 12"
    alerts = [a for a in http_json("GET", gateway.url + "/admin/v1/alerts",
                                   token=gateway.admin_token)[1]["data"] if a["client"] == "thief"]
    assert alerts and all(a["shadow"] is True for a in alerts)
    assert gateway.log_file is not None
    assert "is now *block* (shadow: recorded, not enforced)" in gateway.log_file.read_text()

    browser = ConsoleClient(gateway)
    try:
        assert location(browser.login()) == "/console/"
        page = browser.get("/client", name="thief").text
        assert "block</span> — every request refused (shadowed by an operator: recorded, not " \
            "applied)" in page
        listing = browser.get("/clients").text
        assert "pinned: shadow" in listing and "shadow: not applied" in listing
        assert "shadow: not applied" in browser.get("/alerts").text
    finally:
        browser.close()

    status, body = pin(gateway, "thief", "clear", "seen enough")
    assert status == 200 and body == {"client": "thief", "override": None, "level": "block"}
    until(lambda: harvest(gateway, thief, rng) == 403, "clear did not let detection act")
    record_now = detail(gateway, "thief")["record"]
    assert record_now["shadow"] is False and record_now["action"]["level"] == "block"


async def test_the_detector_keeps_scoring_a_shadowed_client_and_follows_the_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelfence.detect.service.OVERRIDE_REFRESH_SECONDS", 0.0)
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        state = SqlState(engine)
        operator = OperatorActions(state, Policy(DetectionConfig()))
        posts: list[dict[str, Any]] = []
        detector = service(engine, posts)
        await operator.pin("thief", "shadow", "watch")
        events = harvester("thief", 120, seed=1)
        for i in range(0, 100, 20):
            await detector.handle(events[i : i + 20])
        thief = await state.get("thief")
        assert thief is not None and thief.level == "block" and thief.shadow
        assert "thief" not in await state.actions()
        assert posts and all("(shadow: recorded, not enforced)" in p["text"] for p in posts)
        async with transaction(engine) as conn:
            alerts = (await conn.execute(select(detection_alerts.c.shadow))).scalars().all()
            audited = (
                await conn.execute(
                    select(detection_audit.c.shadow).where(detection_audit.c.source == "detector")
                )
            ).scalars().all()
        assert alerts and all(alerts) and audited and all(audited)

        cleared = await operator.pin("thief", "clear", "act now")
        assert cleared.level == "block" and (await state.actions())["thief"].blocks
        await detector.handle(events[100:120])  # the detector follows: nothing shadowed again
        thief = await state.get("thief")
        assert thief is not None and not thief.shadow and thief.level == "block"

        await operator.pin("thief", "probation", "hold it")
        await detector.handle(harvester("thief", 20, seed=2, start=1000.0))
        thief = await state.get("thief")
        assert thief is not None and thief.probation and thief.level == "block"
        assert (await state.actions())["thief"] == Action("block", thief.quota_share, True)


# --- probation ---------------------------------------------------------------------------


def test_a_client_on_probation_meets_the_probation_allowance_whatever_its_account(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(detection=DETECTION, accounts={"allowances": ALLOWANCES})
    suspect = gateway.create_key("suspect", account=account_id(), metadata=VERIFIED)
    loner = gateway.create_key("loner")  # no account: charged on its own
    peer = gateway.create_key("peer", account=account_id(), metadata=VERIFIED)  # same tier
    walk_in = gateway.create_key("walk-in")
    assert embed(gateway, suspect, 50)[0] == 200  # standard: 1,000 rows a day
    for client in ("suspect", "loner"):
        status, body = pin(gateway, client, "probation", "resells answers, ticket 9")
        assert status == 200
        assert body == {"client": client, "override": "probation", "level": "normal"}

    headers, message = refused_on_probation(gateway, suspect)
    assert headers["x-modelfence-trust"] == "probation" and int(headers["retry-after"]) >= 1
    assert message.startswith("The API operator put this client on probation: it may use 10 "
                              "rows a day and 100 over 30 days.")
    used = re.search(r"Used: (\d+) today", message)
    assert used and int(used.group(1)) >= 50  # its account's use counts, as with a demotion
    assert "widens when the operator lifts the probation" in message
    assert "review" not in message and "detect" not in message
    _, message = refused_on_probation(gateway, loner)
    assert "operator put this client on probation" in message and "Used: 8 today" in message
    assert embed(gateway, peer, 50)[0] == 200 and embed(gateway, walk_in, 50)[0] == 200
    metrics = http_json("GET", gateway.url + "/metrics")[1]
    assert 'modelfence_detection_enforced_total{action="probation"}' in metrics

    seen = detail(gateway, "suspect")
    assert seen["override"] == "probation" and seen["record"]["probation"] is True
    assert seen["record"]["action"]["probation"] is True
    assert seen["record"]["level"] == "normal"  # detection's own level: nothing found
    assert seen["audit"][0]["action"] == "probation" and seen["audit"][0]["source"] == "admin"

    for client in ("suspect", "loner"):
        assert pin(gateway, client, "clear", "refunded")[1]["override"] is None
    until(lambda: embed(gateway, suspect, 4)[0] == 200, "clear did not lift the probation")
    until(lambda: embed(gateway, loner, 4)[0] == 200, "clear did not lift the probation")
    assert detail(gateway, "loner")["record"]["probation"] is False


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.parametrize("shadow_mode", [False, True], ids=["enforcing", "shadow-mode"])
def test_probation_reaches_every_replica_in_every_mode(
    start_gateway: GatewayFactory, postgres_url: str, shadow_mode: bool
) -> None:
    with private_redis() as (redis_url, _server):
        shared = {
            "store": postgres_url,
            "limits": {"backend": redis_url},
            "detection": {**DETECTION, "feed": "redis", "shadow": shadow_mode},
            "accounts": {"allowances": ALLOWANCES},
        }
        first, second = (start_gateway(name=f"replica{i}", **shared) for i in range(2))
        client = f"suspect-{uuid.uuid4().hex[:8]}"
        key = first.create_key(client)
        peer = first.create_key(f"peer-{uuid.uuid4().hex[:8]}")
        assert pin(second, client, "probation", "ticket 31")[0] == 200  # one replica's API
        refused_on_probation(first, key)  # the other replica applies it
        # One allowance for the client across replicas (the Redis limits backend), once
        # the pin reaches the second replica at its next state poll.
        until(lambda: embed(second, key, 4)[0] == 429, "the pin did not reach the other replica")
        assert embed(first, peer, 50)[0] == 200 and embed(second, peer, 50)[0] == 200
        assert pin(first, client, "clear", "done")[0] == 200
        until(lambda: embed(second, key, 4)[0] == 200, "clear did not reach the other replica")


# --- the published state's readers -------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield engine


@pytest.mark.redis
async def test_every_reader_of_the_published_state_sees_both_pins(
    engine: AsyncEngine, redis_url: str
) -> None:
    redis = Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:8]
    watched, held = f"watched-{tag}", f"held-{tag}"
    state, shared = SqlState(engine), RedisState(redis)
    operator = OperatorActions(state, Policy(DetectionConfig()), shared=shared)
    try:
        await state.publish([record(watched, 0.95, level="block", quota_share=0.25)])
        shadowed = await operator.pin(watched, "shadow", "watch")
        assert shadowed.level == "block"  # the detector's level stands, unapplied
        assert (await operator.pin(held, "probation", "hold")).level == "normal"
        probation = Action("normal", probation=True)
        for reader in (state, shared, PinnedState(state)):
            actions = await reader.actions()
            assert watched not in actions and actions[held] == probation, reader

        # From a pinned level to probation: detection decides the level again.
        await operator.pin(watched, "block", "enough")
        await operator.pin(watched, "probation", "hold instead")
        enforcing = Action("block", 0.25, probation=True)
        assert (await state.actions())[watched] == enforcing
        assert (await shared.actions())[watched] == enforcing
        # Shadow mode applies the operator's probation, not the detector's level.
        assert (await PinnedState(state).actions())[watched] == probation

        await operator.pin(watched, "clear", "")
        await operator.pin(held, "clear", "")
        assert (await state.actions()).get(watched) == Action("block", 0.25)
        assert held not in await state.actions() and held not in await shared.actions()
    finally:
        await redis.hdel(ACTIONS_KEY, watched, held)
        await redis.aclose()


# --- hostile input and the console ---------------------------------------------------------


HOSTILE_ACTIONS: list[Any] = ["Shadow", "shadow ", "probation\x00", "probation;block",
                              "<script>", "", "allow,shadow", ["shadow"], None, 1,
                              {"probation": True}]


def test_hostile_action_values_are_refused_naming_the_field(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(detection=DETECTION)
    gateway.create_key("target")
    for value in HOSTILE_ACTIONS:
        status, body = pin(gateway, "target", value)
        assert status == 422 and body["error"]["param"] == "action", (value, body)
    status, body = pin(gateway, "target", "probation", "two\x00words")
    assert status == 422 and body["error"]["param"] == "note"

    browser = ConsoleClient(gateway)
    try:
        assert location(browser.login()) == "/console/"
        for value in HOSTILE_ACTIONS:
            if not isinstance(value, str) or "\x00" in value:
                continue  # a form carries text only; NUL is refused by the form parser
            page = browser.post("/act", {"client": "target", "action": value, "reason": "x"})
            assert page.status_code == 400, (value, page.text[:300])
            [message] = ALERT.findall(page.text)
            assert message.startswith("action: "), message
            assert "<script>" not in page.text
        match = CSRF.search(browser.get("/").text)
        assert match is not None
        twice = browser.http.post("/console/act", data={
            "csrf": match.group(1), "client": "target", "action": ["shadow", "block"],
            "reason": "x"})
        assert twice.status_code == 400
        assert ALERT.findall(twice.text) == ["action: given more than once"]
    finally:
        browser.close()
    status, body = http_json("GET", f"{gateway.url}/admin/v1/clients/target",
                             token=gateway.admin_token)
    assert status == 404 and body["error"]["code"] == "client_not_found"  # nothing pinned


def test_the_console_act_form_offers_and_applies_shadow_and_probation(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(detection=DETECTION, accounts={"allowances": ALLOWANCES})
    key = gateway.create_key("reseller")  # no account
    browser = ConsoleClient(gateway)
    try:
        assert location(browser.login()) == "/console/"
        page = browser.get("/client", name="reseller").text
        offered = re.findall(r'<option value="([a-z]+)">([^<]*)</option>', page)
        shadow = "shadow — keep scoring, recording and alerting, apply nothing (the level " \
            "stays visible)"
        assert ("shadow", shadow) in offered
        assert any(action == "probation" and "probation allowance" in words
                   for action, words in offered)

        done = browser.post("/act", {"client": "reseller", "action": "probation",
                                     "reason": "resold answers, ticket 77"})
        assert location(done) == "/console/client?name=reseller&done=probation"
        _, message = refused_on_probation(gateway, key)
        assert "operator put this client on probation" in message
        page = browser.get("/client", name="reseller", done="probation").text
        assert "Done: probation" in page and "probation — “resold answers, ticket 77”" in page
        assert "an operator put this client on probation" in page

        done = browser.post("/act", {"client": "reseller", "action": "shadow",
                                     "reason": "watch only"})
        assert location(done) == "/console/client?name=reseller&done=shadow"
        # One pin at a time: shadow replaced probation, and applies nothing.
        until(lambda: embed(gateway, key, 4)[0] == 200, "shadow did not replace probation")
        seen = detail(gateway, "reseller")
        assert seen["override"] == "shadow" and seen["record"]["shadow"] is True
        assert seen["record"]["probation"] is False
        audit = browser.get("/audit", client="reseller").text
        assert "resold answers, ticket 77" in audit and "watch only" in audit

        done = browser.post("/act", {"client": "reseller", "action": "clear", "reason": "ok"})
        assert location(done) == "/console/client?name=reseller&done=clear"
        seen = detail(gateway, "reseller")
        assert seen["override"] is None and seen["record"]["shadow"] is False
        assert "none: detection decides" in browser.get("/client", name="reseller").text
    finally:
        browser.close()


@pytest.mark.redis
def test_telemetry_carries_the_accounts_own_trust_under_a_probation_pin(
    start_gateway: GatewayFactory,
) -> None:
    """Detection links accounts on probation to one another: an operator's pin must not
    make a client look like one."""
    with private_redis() as (redis_url, _server):
        gateway = start_gateway(
            limits={"backend": redis_url},
            detection={**DETECTION, "feed": "redis"},
            accounts={"allowances": ALLOWANCES},
        )
        suspect = gateway.create_key("suspect", account=account_id(), metadata=VERIFIED)
        loner = gateway.create_key("loner")
        for client in ("suspect", "loner"):
            assert pin(gateway, client, "probation", "ticket 40")[0] == 200
        refused_on_probation(gateway, suspect)
        refused_on_probation(gateway, loner)

        def trust_seen() -> dict[str, set[str]]:
            seen: dict[str, set[str]] = {}
            redis = SyncRedis.from_url(redis_url)
            try:
                for stream in redis.scan_iter(match="modelfence:events:*", _type="stream"):
                    for _, entry in redis.xrange(stream):
                        event = orjson.loads(entry[b"e"])
                        seen.setdefault(event["client"], set()).add(event["trust"])
            finally:
                redis.close()
            return seen

        until(lambda: {"suspect", "loner"} <= trust_seen().keys(), "no events reached Redis")
        seen = trust_seen()
        assert seen["suspect"] == {"standard"} and seen["loner"] == {"standard"}, seen
