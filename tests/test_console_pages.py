"""The console's pages and actions against a real ``modelfence serve``: a block set in the
console refuses the client's next request and is audited; the client list pages, sorts and
filters in the store; alerts are acknowledged; links are cut; a leaked text and a suspect model are traced."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from modelfence.detect.alerts import Alerter
from modelfence.detect.state import ClientRecord, SqlState
from modelfence.models.gguf import gguf_tokenizer
from modelfence.store import open_engine
from modelfence.testing.processes import GatewayProcess, ServiceProcess, http_json
from modelfence.watermark.lexical import LexicalMark

from .conftest import GatewayFactory
from .console_client import ConsoleClient, location
from .test_watermark_lexical import LEXICON, prose, seed_of

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
ROW = re.compile(r'<a href="/console/client\?name=([^"]+)">')


def record(client: str, risk: float, **fields: Any) -> ClientRecord:
    base: dict[str, Any] = {
        "client": client, "tier": "default", "entity": None, "risk": risk, "level": "normal",
        "quota_share": 1.0, "reasons": [], "queries": 10, "shadow": False,
        "updated_at": datetime.now(UTC),
    }
    return ClientRecord(**{**base, **fields})


@pytest.fixture
def gateway(start_gateway: GatewayFactory, fake_upstream: ServiceProcess) -> GatewayProcess:
    return start_gateway(
        detection={"embedder": "hashing", "state_poll_seconds": 0.2},
        telemetry={"batch_size": 10},
        # The suspect model's tests: the fake upstream, and a listed port nothing answers on.
        forensics={"allowed_suspect_urls": [fake_upstream.url, "http://127.0.0.1:1"]},
    )


@pytest.fixture
async def state(gateway: GatewayProcess, tmp_path: Path) -> AsyncIterator[SqlState]:
    """The gateway's own state database, opened by the test as another process would."""
    engine = open_engine(f"sqlite:///{tmp_path / 'state.db'}")
    yield SqlState(engine)
    await engine.dispose()


@pytest.fixture(scope="module")
def converted_tokenizer() -> None:
    """Text forensics reads the demo tokenizer converted from its GGUF file; the first
    conversion on a machine takes longer than the browser waits, so it is made here, in
    the cache the gateway reads (``models.gguf.gguf_tokenizer``)."""
    gguf_tokenizer()


@pytest.fixture
def browser(gateway: GatewayProcess) -> Iterator[ConsoleClient]:
    client = ConsoleClient(gateway)
    assert location(client.login()) == "/console/"
    yield client
    client.close()


def test_a_block_set_in_the_console_refuses_the_next_request_and_is_audited(
    gateway: GatewayProcess, browser: ConsoleClient
) -> None:
    key = gateway.create_key("thief")
    assert http_json("POST", gateway.url + "/v1/chat/completions", CHAT, token=key)[0] == 200
    page = browser.get("/client", name="thief")
    assert page.status_code == 200 and "Act" in page.text

    done = browser.post("/act", {"client": "thief", "action": "block",
                                 "reason": "harvesting answers, ticket 4711"})
    assert location(done) == "/console/client?name=thief&done=block"
    deadline = time.monotonic() + 10
    status, body = 200, None
    while status == 200 and time.monotonic() < deadline:
        status, body = http_json("POST", gateway.url + "/v1/chat/completions", CHAT, token=key)
        time.sleep(0.1)
    assert status == 403 and body["error"]["code"] == "client_blocked"

    audit = browser.get("/audit").text
    assert "harvesting answers, ticket 4711" in audit and "operator" in audit
    _, detail = http_json("GET", gateway.url + "/admin/v1/clients/thief", token=gateway.admin_token)
    assert detail["override"] == "block"
    assert detail["audit"][0]["source"] == "admin"
    assert detail["audit"][0]["reasons"][0]["text"] == "harvesting answers, ticket 4711"
    client_page = browser.get("/client", name="thief", done="block").text
    assert "Done: block" in client_page
    assert "block — “harvesting answers, ticket 4711”" in client_page

    browser.post("/act", {"client": "thief", "action": "clear", "reason": "false alarm"})
    deadline = time.monotonic() + 10
    while status != 200 and time.monotonic() < deadline:
        status, _ = http_json("POST", gateway.url + "/v1/chat/completions", CHAT, token=key)
        time.sleep(0.1)
    assert status == 200


async def test_the_client_list_pages_sorts_and_filters_in_the_store(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient
) -> None:
    harvesting = [{"code": "llm_harvesting", "text": "share 0.9 > 0.5", "score": 0.8}]
    await state.publish(
        [record(f"c{i:03}", i / 200, tier="tiny" if i % 2 else "default",
                level="alert" if i >= 100 else "normal",
                reasons=harvesting if i % 10 == 0 else [])
         for i in range(120)]
    )
    gateway.create_key("c007", account="acme")

    def names(**params: Any) -> list[str]:
        response = browser.get("/clients", **params)
        assert response.status_code == 200, response.text[:300]
        return ROW.findall(response.text)

    assert names()[:3] == ["c119", "c118", "c117"]  # riskiest first
    assert len(names()) == 50 and len(names(page=3)) == 20 and names(page=4) == []
    assert names(sort="client", order="asc", per_page=5) == ["c000", "c001", "c002", "c003",
                                                             "c004"]
    assert names(sort="risk", order="asc", per_page=2) == ["c000", "c001"]
    assert set(names(level="alert", per_page=200)) == {f"c{i:03}" for i in range(100, 120)}
    assert names(reason="llm_harvesting", per_page=3) == ["c110", "c100", "c090"]
    assert all(int(n[1:]) % 2 for n in names(tier="tiny", per_page=200))
    assert names(account="acme") == ["c007"]
    assert names(q="c11", sort="client", order="asc", per_page=3) == ["c110", "c111", "c112"]
    assert names(q="%") == []  # a wildcard is a character here
    listing = browser.get("/clients", level="alert").text
    assert "20 clients" in listing and "page 1 of 1" in listing


async def test_alerts_are_acknowledged_once_and_links_cut_with_a_reason(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient
) -> None:
    flagged = record("mallory", 0.6, level="tighten", entity="ent_1", reasons=[
        {"code": "machine_timing", "text": "regularity 0.97 > 0.9", "score": 0.7}],
        links=[{"other": "trent", "kinds": ["fingerprint", "ip_prefix"], "weight": 0.92,
                "joins": True, "cut": False}])
    await state.publish([flagged, record("trent", 0.1, entity="ent_1")])
    alerter = Alerter(state.engine, webhook_url=None, public_url="http://gw", dedup_seconds=0)
    assert await alerter.alert(flagged, time.time())

    alerts = browser.get("/alerts").text
    alert_id = re.search(r'name="alert" value="(\d+)"', alerts)
    assert alert_id is not None and "mallory" in alerts
    assert location(browser.post("/alerts/ack", {"alert": alert_id.group(1)})) == "/console/alerts"
    acknowledged = browser.get("/alerts").text
    assert 'name="alert"' not in acknowledged and "UTC" in acknowledged
    assert browser.post("/alerts/ack", {"alert": "999999"}).status_code == 404
    assert "0 not acknowledged" in browser.get("/").text

    page = browser.get("/client", name="mallory").text
    assert "machine_timing" in page and "regularity 0.97 &gt; 0.9" in page
    assert "one client fingerprint" in page and "Cut link" in page
    assert browser.post("/cut", {"client": "mallory", "other": "mallory",
                                 "reason": "x"}).status_code == 400
    cut = browser.post("/cut", {"client": "mallory", "other": "trent",
                                "reason": "two teams of one customer"})
    assert location(cut) == "/console/client?name=mallory&done=cut"
    assert await state.cuts() == [("mallory", "trent")]
    assert "link with trent: two teams of one customer" in browser.get("/audit").text


def test_the_overview_and_the_evidence_export_tell_what_happened(
    gateway: GatewayProcess, browser: ConsoleClient
) -> None:
    key = gateway.create_key("alice", "tiny")
    statuses = [http_json("POST", gateway.url + "/v1/chat/completions", CHAT, token=key)[0]
                for _ in range(4)]
    assert 429 in statuses and 200 in statuses
    deadline = time.monotonic() + 10
    overview = ""
    while time.monotonic() < deadline and "limits, budgets" not in overview:
        time.sleep(0.2)  # telemetry is written in batches, off the request path
        overview = browser.get("/").text
    assert "limits, budgets or probation allowance" in overview
    assert "Telemetry events dropped" in overview

    exported = browser.get("/evidence.json", name="alice")
    assert exported.headers["content-disposition"] == (
        "attachment; filename=\"evidence-alice.json\"; filename*=UTF-8''evidence-alice.json")
    evidence = orjson.loads(exported.content)
    assert evidence["client"] == "alice" and evidence["keys"][0]["tier"] == "tiny"
    assert sum(hour["requests"] for hour in evidence["timeline"]) == len(statuses)
    report = browser.get("/report", name="alice").text
    assert "Evidence report: client alice" in report and f"{len(statuses)} requests" in report
    assert browser.get("/client", name="nobody").status_code == 404


def test_a_leaked_text_is_traced_to_its_client_in_words(
    gateway: GatewayProcess, browser: ConsoleClient, converted_tokenizer: None
) -> None:
    for client in ("leaker", "bystander"):
        gateway.create_key(client)
    leaked = LexicalMark(LEXICON, seed_of("leaker"), max_change_share=0.1).text(prose(800, 5))
    page = browser.post("/forensics", {"text": leaked})
    assert page.status_code == 200, page.text[:300]
    assert "This text carries the mark of client" in page.text
    assert '<a href="/console/client?name=leaker">leaker</a>' in page.text
    assert "bystander</a>" not in page.text and "p-value" in page.text

    clean = browser.post("/forensics", {"text": prose(300, 6)})
    assert "This text carries the mark" not in clean.text
    assert clean.text.count("No client's mark found") == 2  # neither kind of mark
    empty = browser.post("/forensics", {"text": ""})
    assert empty.status_code == 400 and "text: " in empty.text


HOSTILE_NAMES = ['"><script>alert(1)</script>', "名前", "Ⅻ", "a&page=2&sort=x", "javascript:alert(1)"]


async def test_hostile_client_names_are_escaped_everywhere_and_still_export(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient
) -> None:
    reasons = [{"code": "machine_timing", "text": 'spacing "code" <b>', "score": 0.5}]
    await state.publish([record(name, 0.9, level="alert", reasons=reasons) for name in HOSTILE_NAMES])
    listing = browser.get("/clients", per_page=200)
    assert listing.status_code == 200 and "<script>alert(1)" not in listing.text
    assert "&lt;script&gt;" in listing.text
    for name in HOSTILE_NAMES:
        page = browser.get("/client", name=name)
        assert page.status_code == 200, (name, page.text[:200])
        assert "<script>alert(1)" not in page.text and 'href="javascript:' not in page.text
        export = browser.get("/evidence.json", name=name)
        assert export.status_code == 200, (name, export.text[:200])  # not a 500 from the header
        assert orjson.loads(export.content)["client"] == name
        assert export.headers["content-disposition"].isascii()
        assert browser.get("/report", name=name).status_code == 200


async def test_the_reason_filter_matches_a_reasons_code_not_a_json_key(
    gateway: GatewayProcess, state: SqlState, browser: ConsoleClient
) -> None:
    timing = [{"code": "machine_timing", "text": "W 0.38", "score": 0.5}]
    await state.publish([record("timed", 0.5, reasons=timing)])
    for key in ("code", "text", "score"):
        assert ROW.findall(browser.get("/clients", reason=key).text) == []
    assert ROW.findall(browser.get("/clients", reason="machine_timing").text) == ["timed"]


def test_a_long_pasted_text_in_any_script_fits_the_form_limit(
    browser: ConsoleClient, converted_tokenizer: None
) -> None:
    response = browser.post("/forensics", {"text": "名前、" * 19_000})  # 57,000 characters
    # It reaches the verifier (which knows no client here) and comes back with the page.
    assert response.status_code != 413 and "名前、名前、" in response.text
    assert re.findall(r'role="alert">([^<]*)', response.text) == [
        "no clients are known: nothing to attribute the text to"]


SECRET_KEY = "sk-suspect-never-echoed-0123"
ALERTS = re.compile(r'role="alert">([^<]*)')


def test_a_suspect_model_is_tested_only_where_the_config_allows(
    gateway: GatewayProcess, fake_upstream: ServiceProcess, browser: ConsoleClient
) -> None:
    gateway.create_key("leaker")
    suspect = {"kind": "embeddings", "model": "fake-embed", "api_key": SECRET_KEY}
    page = browser.post("/forensics/model", {"url": fake_upstream.url, **suspect})
    assert page.status_code == 200, page.text[:500]
    assert "No client's mark found: the answers point to nobody" in page.text
    assert re.search(r"best p-value\s+[0-9.e+-]+ after allowing", page.text)
    assert "<td>leaker</td>" in page.text and "exact stratified null" in page.text
    assert f'value="{fake_upstream.url}"' in page.text  # the form keeps what was typed

    for url in ("http://169.254.169.254/latest/meta-data", fake_upstream.url.replace(
            "127.0.0.1", "localhost")):
        refused = browser.post("/forensics/model", {"url": url, **suspect})
        assert refused.status_code == 403, refused.text[:300]
        [message] = ALERTS.findall(refused.text)
        assert "queries only suspects listed" in message
        assert "forensics.allowed_suspect_urls" in message

    gone = browser.post("/forensics/model", {"url": "http://127.0.0.1:1/v1", **suspect})
    assert gone.status_code == 502, gone.text[:300]  # listed, asked, no answer
    assert "is unreachable" in ALERTS.findall(gone.text)[0]
    for response in (page, refused, gone):
        assert SECRET_KEY not in response.text and "sk-suspect" not in response.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "vision"),
        ("kind", "<script>"),
        ("url", "http://127.0.0.1/" + "a" * 3000),
        ("url", "file:///etc/passwd"),
        ("url", "http://user:pw@127.0.0.1/"),
        ("api_key", "two words " + SECRET_KEY),
        ("api_key", "k" * 1001),
        ("model", "two\nlines"),
        ("client", "x" * 500),
        ("max_tokens", "100000"),
        ("extra", "1"),
    ],
)
def test_hostile_suspect_fields_are_refused_naming_the_field(
    fake_upstream: ServiceProcess, browser: ConsoleClient, field: str, value: str
) -> None:
    form = {"url": fake_upstream.url, "kind": "embeddings", "api_key": SECRET_KEY, field: value}
    page = browser.post("/forensics/model", form)
    assert page.status_code == 400, page.text[:300]
    [message] = ALERTS.findall(page.text)
    assert message.startswith(f"{field}: "), message
    assert SECRET_KEY not in page.text and "<script>" not in page.text
    assert 'type="password"' in page.text and 'name="api_key" value' not in page.text
