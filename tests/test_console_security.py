"""The console's door, against a real ``modelfence serve``: login, cookie, CSRF, fixation,
expiry, refused guesses, hostile parameters, and no secret on any page."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from modelfence.testing.processes import GatewayProcess, http_json

from .conftest import GatewayFactory
from .console_client import ConsoleClient, location

PAGES = ["/", "/clients", "/campaigns", "/alerts", "/audit", "/forensics"]


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> GatewayProcess:
    return start_gateway(detection={"enabled": False})


@pytest.fixture
def consoles() -> Iterator[Callable[[GatewayProcess], ConsoleClient]]:
    """Open more browsers; each is closed after the test, however it ends."""
    opened: list[ConsoleClient] = []

    def open_console(gateway: GatewayProcess) -> ConsoleClient:
        opened.append(ConsoleClient(gateway))
        return opened[-1]

    yield open_console
    for client in opened:
        client.close()


@pytest.fixture
def browser(
    gateway: GatewayProcess, consoles: Callable[[GatewayProcess], ConsoleClient]
) -> ConsoleClient:
    return consoles(gateway)


def test_the_console_is_not_served_without_an_admin_token(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(admin_token=None, detection={"enabled": False})
    for path in ["/console", "/console/", "/console/login", "/console/static/console.css"]:
        response = httpx.get(gateway.url + path)
        assert response.status_code == 404, path
    assert httpx.post(gateway.url + "/console/login", data={"token": "x" * 20}).status_code == 404


def test_login_gives_a_strict_httponly_cookie_and_logout_ends_the_session(
    browser: ConsoleClient,
) -> None:
    assert location(browser.get("/")) == "/console/login"
    login = browser.login()
    assert location(login) == "/console/"
    cookie = login.headers["set-cookie"].lower()
    for attribute in ("httponly", "samesite=strict", "path=/console"):
        assert attribute in cookie, cookie
    assert "secure" not in cookie  # plain http here; https requests get Secure
    session = browser.session_cookie()
    assert session and browser.gateway.admin_token not in session
    for path in PAGES:
        assert browser.get(path).status_code == 200, path
    bare = browser.http.get("/console")
    assert bare.status_code in (303, 307) and bare.headers["location"].endswith("/console/")

    assert location(browser.post("/logout", {})) == "/console/login"
    browser.plant(session)  # a copy kept elsewhere
    for path in PAGES:
        assert location(browser.get(path)) == "/console/login", path


def test_pages_and_forms_without_a_session_lead_to_the_login_form(
    browser: ConsoleClient, gateway: GatewayProcess
) -> None:
    for path in [*PAGES, "/client?name=x", "/report?name=x", "/evidence.json?name=x", "/nope"]:
        assert location(browser.get(path)) == "/console/login", path
    blocked = browser.post("/act", {"client": "victim", "action": "block", "reason": "r"},
                           csrf=False)
    assert location(blocked) == "/console/login"
    status, body = http_json("GET", gateway.url + "/admin/v1/clients/victim",
                             token=gateway.admin_token)
    assert status == 404, body  # nothing was pinned


def test_a_wrong_token_is_refused_and_guessing_is_limited_with_the_admin_api(
    start_gateway: GatewayFactory, consoles: Callable[[GatewayProcess], ConsoleClient]
) -> None:
    gateway = start_gateway(detection={"enabled": False}, server={"auth_failures_per_minute": 2})
    browser = consoles(gateway)
    for _ in range(2):
        wrong = browser.login("not-the-admin-token-at-all")
        assert wrong.status_code == 401 and "Incorrect admin token" in wrong.text
        assert "set-cookie" not in wrong.headers
    refused = browser.login()  # even the right token: this address is refused for a while
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    status, body = http_json("GET", gateway.url + "/admin/v1/keys", token=gateway.admin_token)
    assert status == 429 and body["error"]["code"] == "too_many_auth_failures"


def test_a_session_id_set_before_login_is_never_adopted(
    browser: ConsoleClient, consoles: Callable[[GatewayProcess], ConsoleClient]
) -> None:
    browser.plant("attacker-chosen-id")
    assert location(browser.get("/")) == "/console/login"
    browser.login()
    assert browser.session_cookie() != "attacker-chosen-id"

    # A real session id planted in a victim's browser is ended by the victim's login.
    planted = browser.session_cookie()
    assert planted is not None
    victim = consoles(browser.gateway)
    victim.plant(planted)
    victim.login()
    assert victim.session_cookie() not in (None, planted)
    assert victim.get("/").status_code == 200
    assert location(browser.get("/")) == "/console/login"  # the planted id is dead


def test_posts_without_the_sessions_csrf_token_are_refused_and_change_nothing(
    browser: ConsoleClient, gateway: GatewayProcess,
    consoles: Callable[[GatewayProcess], ConsoleClient],
) -> None:
    key = gateway.create_key("victim")
    other = consoles(gateway)
    other.login()
    foreign = other.csrf()  # a valid token, of another session
    browser.login()
    form = {"client": "victim", "action": "block", "reason": "forged"}
    for csrf in (None, "", "wrong", foreign):
        data = form if csrf is None else {**form, "csrf": csrf}
        response = browser.http.post("/console/act", data=data)
        assert response.status_code == 403 and "CSRF" in response.text, csrf
    cross = browser.http.post("/console/act", data={**form, "csrf": browser.csrf()},
                              headers={"origin": "http://evil.example"})
    assert cross.status_code == 403
    logout = browser.http.post("/console/logout", data={"csrf": "wrong"})
    assert logout.status_code == 403 and browser.get("/").status_code == 200  # still logged in
    status, _ = http_json("GET", gateway.url + "/admin/v1/clients/victim", token=gateway.admin_token)
    assert status == 404  # no pin, no audit row
    status, _ = http_json("POST", gateway.url + "/v1/chat/completions",
                          {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]},
                          token=key)
    assert status == 200


def test_an_idle_session_expires(
    start_gateway: GatewayFactory, consoles: Callable[[GatewayProcess], ConsoleClient]
) -> None:
    gateway = start_gateway(detection={"enabled": False}, console={"idle_minutes": 0.02})
    browser = consoles(gateway)
    browser.login()
    assert browser.get("/").status_code == 200
    time.sleep(1.6)
    assert location(browser.get("/")) == "/console/login"


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/clients?page=-1", "page"),
        ("/clients?page=abc", "page"),
        ("/clients?per_page=100000", "per_page"),
        ("/clients?sort=garbage", "sort"),
        ("/clients?order=sideways", "order"),
        ("/clients?level=nuke", "level"),
        ("/clients?reason=%3Cscript%3Ealert(1)%3C/script%3E", "reason"),
        ("/clients?tier=" + "t" * 5000, "tier"),
        ("/clients?q=%00", "q"),
        ("/clients?page=1&page=2", "page"),
        ("/clients?bogus=1", "bogus"),
        ("/audit?page=0", "page"),
        ("/alerts?per_page=0", "per_page"),
        ("/client", "name"),
        ("/client?name=" + "n" * 201, "name"),
    ],
)
def test_hostile_parameters_are_a_400_naming_the_parameter(
    browser: ConsoleClient, path: str, param: str
) -> None:
    browser.login()
    response = browser.http.get("/console" + path)
    assert response.status_code == 400, response.text[:300]
    assert f"{param}: " in response.text
    assert "<script>" not in response.text


def test_hostile_forms_are_a_400_naming_the_field(
    browser: ConsoleClient, gateway: GatewayProcess
) -> None:
    browser.login()
    cases = [
        ({"client": "victim", "action": "block", "reason": ""}, "reason"),  # a reason is required
        ({"client": "victim", "action": "nuke", "reason": "r"}, "action"),
        ({"client": "", "action": "block", "reason": "r"}, "client"),
        ({"client": "victim", "action": "block", "reason": "r" * 501}, "reason"),
    ]
    for form, field in cases:
        response = browser.post("/act", form)
        assert response.status_code == 400 and f"{field}: " in response.text, form
    huge = browser.post("/act", {"client": "victim", "action": "block", "reason": "r" * 700_000})
    assert huge.status_code == 413  # past the 640 KiB form limit: not even parsed
    status, _ = http_json("GET", gateway.url + "/admin/v1/clients/victim", token=gateway.admin_token)
    assert status == 404


def test_no_page_shows_a_key_or_the_admin_token_and_every_page_sends_security_headers(
    browser: ConsoleClient, gateway: GatewayProcess
) -> None:
    keys = [gateway.create_key("alice"), gateway.create_key("bob", account="acme")]
    for key in keys:
        status, _ = http_json("POST", gateway.url + "/v1/chat/completions",
                              {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]},
                              token=key)
        assert status == 200
    browser.login()
    secrets = [*keys, gateway.admin_token]
    paths = [*PAGES, "/client?name=alice", "/client?name=bob", "/report?name=bob",
             "/evidence.json?name=bob", "/audit?client=bob", "/clients?account=acme",
             "/account?id=acme"]
    for path in paths:
        response = browser.http.get("/console" + path)
        assert response.status_code == 200, path
        assert not [s for s in secrets if s in response.text], path
        assert response.headers["x-frame-options"] == "DENY"
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
    bob = browser.get("/client", name="bob").text
    assert keys[1][:8] in bob and keys[1][:12] not in bob  # the prefix, to recognise it, only
    login_page = httpx.get(gateway.url + "/console/login")
    assert login_page.headers["x-frame-options"] == "DENY"
    assert 'for="token"' in login_page.text


def test_a_planted_second_cookie_neither_hides_the_session_nor_survives_logout(
    gateway: GatewayProcess, browser: ConsoleClient
) -> None:
    assert location(browser.login()) == "/console/"
    real = browser.session_cookie()
    assert real is not None
    tossed = httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=10)
    try:
        for order in (f"mf_console=junk; mf_console={real}", f"mf_console={real}; mf_console=junk"):
            assert tossed.get("/console/", headers={"cookie": order}).status_code == 200
        csrf = browser.csrf()
        out = tossed.post("/console/logout", data={"csrf": csrf},
                          headers={"cookie": f"mf_console=junk; mf_console={real}"})
        assert out.status_code == 303
        # The session the guard checked is the one that ended.
        assert tossed.get("/console/", headers={"cookie": f"mf_console={real}"}).status_code == 303
    finally:
        tossed.close()


def test_behind_a_tls_proxy_the_cookie_can_be_made_secure_always(
    start_gateway: GatewayFactory, consoles: Callable[[GatewayProcess], ConsoleClient]
) -> None:
    gateway = start_gateway(detection={"enabled": False}, console={"secure_cookie": "always"})
    login = consoles(gateway).login()
    assert location(login) == "/console/"
    assert "secure" in login.headers["set-cookie"].lower()  # over plain http to the gateway
