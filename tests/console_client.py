"""A browser-shaped HTTP client for the console tests: cookies, forms, the CSRF token."""

from __future__ import annotations

import re
from typing import Any

import httpx

from modelfence.testing.processes import GatewayProcess

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class ConsoleClient:
    """One browser: a cookie jar, no automatic redirects (tests look at each one)."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.http = httpx.Client(base_url=gateway.url, follow_redirects=False, timeout=10)

    def login(self, token: str | None = None) -> httpx.Response:
        response = self.http.post(
            "/console/login", data={"token": token or self.gateway.admin_token}
        )
        return response

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get("/console" + path, params=params)

    def csrf(self) -> str:
        match = CSRF.search(self.get("/").text)
        assert match is not None, "no CSRF token on the overview: not logged in?"
        return match.group(1)

    def post(self, path: str, data: dict[str, str], *, csrf: bool = True) -> httpx.Response:
        form = {"csrf": self.csrf(), **data} if csrf else data
        return self.http.post("/console" + path, data=form)

    def plant(self, session_id: str) -> None:
        """Put a session cookie in this browser, as the gateway would have set it."""
        self.http.cookies.set("mf_console", session_id, domain="127.0.0.1", path="/console")

    def session_cookie(self) -> str | None:
        return self.http.cookies.get("mf_console")

    def close(self) -> None:
        self.http.close()


def location(response: httpx.Response) -> str:
    assert response.status_code == 303, f"{response.status_code}: {response.text[:300]}"
    return response.headers["location"]
