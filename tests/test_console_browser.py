"""The console in a real browser (Playwright driving Debian's Chromium, headless), against a
real gateway with its detector: an analyst logs in, finds the extracting client at the top
of the list with its reasons, blocks it with a reason, sees the block refuse its next
request and appear in the audit log, exports the evidence, traces a leaked text to it and
logs out.

Screenshots of each page go to ``$MODELFENCE_CONSOLE_SCREENSHOTS`` (``docs/img`` refreshes
the ones in docs/CONSOLE.md), else to the test's temporary folder.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from modelfence.testing.processes import GatewayProcess, http_json
from modelfence.watermark.lexical import LexicalMark

from .conftest import GatewayFactory
from .test_watermark_lexical import LEXICON, prose, seed_of

CHROMIUM = os.environ.get("MODELFENCE_CHROMIUM", "/usr/bin/chromium")
WORDS = ["oven", "museum", "python", "flight", "garlic", "visa", "loop", "bread", "ticket"]
HARVEST = {"temperature": 0, "logprobs": True, "top_logprobs": 5, "max_tokens": 5,
           "fake_chunks": 5}
# Detection in shadow mode (decides, records and alerts, never acts), as a deployment starts:
# whatever refuses the harvester is the analyst's block, which acts in every mode.
DETECTION = {
    "detection": {"embedder": "hashing", "evaluate_every": 5, "state_poll_seconds": 0.2,
                  "shadow": True},
    "telemetry": {"batch_size": 20},
}


def _browser_executable() -> str:
    """Debian's Chromium, or a failure that says how to get it (never a silent skip)."""
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"the console's browser tests need Chromium at {CHROMIUM} and it is missing: "
            "install Debian's package (apt-get install -y chromium) or point "
            "MODELFENCE_CHROMIUM at a Chromium binary",
            pytrace=False,
        )
    return path


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console's browser tests need Playwright: pip install -e '.[test]'",
                    pytrace=False)
    executable = _browser_executable()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        context = browser.new_context(viewport={"width": 1366, "height": 900},
                                      accept_downloads=True)
        yield context.new_page()
        context.close()
        browser.close()


def log_in(page: Any, gateway: GatewayProcess) -> str:
    """Log the browser in with the admin token; returns the console's URL."""
    console = gateway.url + "/console"
    page.goto(console + "/login")
    page.get_by_label("Admin token").fill(gateway.admin_token)
    page.keyboard.press("Enter")
    page.wait_for_url(console + "/")
    return console


def chat(gateway: GatewayProcess, key: str, body: dict[str, Any]) -> int:
    status, _ = http_json("POST", gateway.url + "/v1/chat/completions",
                          {"model": "fake-chat", **body}, token=key)
    return status


def ask(gateway: GatewayProcess, key: str) -> tuple[int, Any]:
    return http_json("POST", gateway.url + "/v1/chat/completions",
                     {"model": "fake-chat", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]}, token=key)


def red_team(gateway: GatewayProcess, thief: str, users: list[str]) -> None:
    """Honest multi-turn chats, and a client harvesting greedy answers with log-probabilities
    until detection names it (its level leaves ``normal``)."""
    rng = random.Random(17)

    def honest(key: str) -> None:
        turns = [{"role": "user", "content": f"how do I {' '.join(rng.sample(WORDS, 4))}"},
                 {"role": "assistant", "content": "like this"},
                 {"role": "user", "content": f"and {rng.choice(WORDS)}?"}]
        assert chat(gateway, key, {"messages": turns, "temperature": 0.8}) == 200

    for _ in range(25):  # established customers: a shared network alone never flags them
        for key in users:
            honest(key)
    deadline = time.monotonic() + 90
    sent = 0
    while time.monotonic() < deadline:
        prompt = f"Explain step by step: {' '.join(rng.sample(WORDS, 5))}"
        assert chat(gateway, thief, {"messages": [{"role": "user", "content": prompt}],
                                     **HARVEST}) == 200
        sent += 1
        if sent % 10 == 0:
            honest(rng.choice(users))
            _, record = http_json("GET", gateway.url + "/admin/v1/clients/thief",
                                  token=gateway.admin_token)
            if (record or {}).get("record") and record["record"]["level"] != "normal":
                return
    pytest.fail(f"detection did not flag the harvesting client after {sent} requests")


def test_an_analyst_finds_blocks_and_documents_an_extracting_client(
    start_gateway: GatewayFactory, page: Any, tmp_path: Path
) -> None:
    shots = Path(os.environ.get("MODELFENCE_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    gateway = start_gateway(**DETECTION)
    thief = gateway.create_key("thief", account="throwaway-ltd")
    users = [gateway.create_key(name) for name in ("alice", "bob", "carol")]
    red_team(gateway, thief, users)
    console = gateway.url + "/console"

    # Log in with the keyboard: the token field has focus and a label.
    page.goto(console + "/")
    assert page.url == console + "/login"
    page.screenshot(path=shots / "console-login.png")
    page.get_by_label("Admin token").fill("wrong-token-xxxxxxxxxx")
    page.keyboard.press("Enter")
    assert page.get_by_role("alert").inner_text() == "Incorrect admin token."
    page.get_by_label("Admin token").fill(gateway.admin_token)
    page.keyboard.press("Enter")
    page.wait_for_url(console + "/")
    page.screenshot(path=shots / "console-overview.png", full_page=True)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"

    # The attacker is at the top of the list, with its reasons.
    page.get_by_role("link", name="Clients", exact=True).click()
    first = page.locator("table.clients tbody tr").first
    assert first.locator("td").first.inner_text() == "thief"
    assert "llm_harvesting" in first.locator("td.reasons").inner_text()
    page.screenshot(path=shots / "console-clients.png", full_page=True)
    first.get_by_role("link", name="thief").click()
    assert "Requests shaped to collect training data" in page.content()

    # Block it with a reason; its next request is refused.
    status, body = ask(gateway, thief)
    assert status == 200, body  # flagged, and still served: shadow mode only records
    page.get_by_label("Action", exact=True).select_option("block")
    page.get_by_label("Reason (kept in the audit log)").fill("extraction sweep, case 2026-17")
    page.get_by_role("button", name="Apply").click()
    assert "Done: block" in page.get_by_role("status").inner_text()
    page.screenshot(path=shots / "console-client.png", full_page=True)
    deadline = time.monotonic() + 10  # every gateway applies it at its next state poll
    while status != 403 and time.monotonic() < deadline:
        status, body = ask(gateway, thief)
        time.sleep(0.05)
    assert status == 403 and body["error"]["code"] == "client_blocked", body
    assert all(ask(gateway, key)[0] == 200 for key in users)

    # The audit log shows who blocked it and why.
    page.get_by_role("link", name="Audit log").click()
    latest = page.locator("table.audit tbody tr").first
    assert "thief" in latest.inner_text() and "extraction sweep, case 2026-17" in latest.inner_text()
    assert "operator" in latest.inner_text()
    page.screenshot(path=shots / "console-audit.png", full_page=True)

    # The alert the detector raised is acknowledged.
    page.get_by_role("link", name="Alerts").click()
    page.screenshot(path=shots / "console-alerts.png", full_page=True)
    pending = page.get_by_role("button", name="Acknowledge alert").count()
    assert pending >= 1 and "thief" in page.locator("main table tbody").inner_text()
    page.get_by_role("button", name="Acknowledge alert").first.click()
    page.wait_for_url(console + "/alerts")
    assert page.get_by_role("button", name="Acknowledge alert").count() == pending - 1

    # Evidence: the JSON export and the printable report.
    page.goto(console + "/client?name=thief")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export evidence (JSON)").click()
    evidence = orjson.loads(Path(download.value.path()).read_bytes())
    assert evidence["client"] == "thief" and evidence["override"][0] == "block"
    assert any(r["code"] == "llm_harvesting" for r in evidence["record"]["reasons"])
    assert thief not in orjson.dumps(evidence).decode()
    page.get_by_role("link", name="Printable evidence report").click()
    page.wait_for_url(console + "/report?name=thief")  # content() mid-navigation is empty
    page.wait_for_load_state()
    assert "Evidence report: client thief" in page.content()
    page.screenshot(path=shots / "console-report.png", full_page=True)
    assert thief not in page.content()

    # Forensics: a text found outside carries the thief's mark.
    leaked = LexicalMark(LEXICON, seed_of("thief"), max_change_share=0.1).text(prose(800, 5))
    page.goto(console + "/")
    page.get_by_role("link", name="Forensics").click()
    page.get_by_label("Text to test").fill(leaked)
    page.get_by_role("button", name="Test the text").click()
    verdict = page.locator("main section").nth(1).inner_text()
    assert "This text carries the mark of client thief" in verdict and "p-value" in verdict
    page.screenshot(path=shots / "console-forensics.png", full_page=True)

    # Log out: the pages are refused from then on.
    page.goto(console + "/")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(console + "/login")
    page.goto(console + "/clients")
    assert page.url == console + "/login"
    assert page.request.get(console + "/audit", max_redirects=0).status == 303
