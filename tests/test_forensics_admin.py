"""The admin API's forensics routes: optional parts missing, and which suspects it may query."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.admin import create_admin_app
from modelfence.admin.forensics import forensics_router
from modelfence.config import Config
from modelfence.forensics.allowlist import SuspectAllowList
from modelfence.forensics.config import ForensicsConfig
from modelfence.forensics.errors import SuspectNotAllowed, VerifyError
from modelfence.forensics.service import Forensics
from modelfence.forensics.text import demo_tokenizer
from modelfence.identity import ServerSecret, SqlKeyStore
from modelfence.store import create_tables
from modelfence.watermark.config import WatermarkConfig
from modelfence.watermark.keys import WatermarkKeyring

from .test_auth_failures import admin_failures
from .test_store_database import scratch_engine

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = ServerSecret(b"test-secret-0123456789abcdef")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        forensics = Forensics(engine, WatermarkKeyring(SECRET), WatermarkConfig.model_validate({}))
        admin = create_admin_app(
            store=SqlKeyStore(engine, SECRET),
            admin_token=TOKEN,
            tiers=("default",),
            failures=admin_failures(1000),
            routers=[
                forensics_router(
                    forensics,
                    ForensicsConfig(allowed_suspect_urls=("http://127.0.0.1:1/v1", "localhost")),
                )
            ],
        )
        app = Starlette(routes=[Mount("/admin", app=admin)])
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw"
        ) as http:
            yield http


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json", response.text
    error: dict[str, Any] = response.json()["error"]
    return error


async def test_verify_text_without_the_demo_extra_is_a_501_naming_it(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What Python does when a package is not installed: ModuleNotFoundError on import.
    monkeypatch.setitem(sys.modules, "transformers", None)
    demo_tokenizer.cache_clear()
    try:
        response = await client.post(
            "/admin/v1/verify/text", json={"text": "some leaked text"}, headers=AUTH
        )
    finally:
        demo_tokenizer.cache_clear()
    assert response.status_code == 501
    error = error_of(response)
    assert error["code"] == "missing_dependency" and error["type"] == "server_error"
    assert "pip install 'modelfence[demo]'" in error["message"]


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("http://169.254.169.254/latest/meta-data", 403, "suspect_not_allowed"),
        ("http://127.0.0.1:1/admin", 403, "suspect_not_allowed"),  # outside the path prefix
        ("http://127.0.0.1:1/v1x", 403, "suspect_not_allowed"),
        ("http://127.0.0.1:2/v1", 403, "suspect_not_allowed"),  # another port
        ("https://127.0.0.1:1/v1", 403, "suspect_not_allowed"),  # another scheme
        ("http://127.0.0.1:1/v1/../admin", 422, "invalid_body"),
        ("http://user:pw@127.0.0.1:1/v1", 422, "invalid_body"),
        ("http://127.0.0.1:1/v1?x=1", 422, "invalid_body"),
        ("file:///etc/passwd", 422, "invalid_body"),
        ("127.0.0.1:1", 422, "invalid_body"),
        ("http://127.0.0.1:1/v1/openai", 502, "suspect_unreachable"),  # allowed: asked
        ("http://LOCALHOST:1", 502, "suspect_unreachable"),  # a bare host: any port
    ],
)
async def test_verify_model_queries_only_listed_suspects(
    client: httpx.AsyncClient, url: str, status: int, code: str
) -> None:
    # A known client, so that verification gets as far as asking the suspect.
    created = await client.post("/admin/v1/keys", json={"client": "acme"}, headers=AUTH)
    assert created.status_code == 201, created.text
    response = await client.post(
        "/admin/v1/verify/model", json={"url": url, "kind": "embeddings"}, headers=AUTH
    )
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code and (status == 502 or error["param"] == "url"), error
    if status == 403:
        assert "forensics.allowed_suspect_urls" in error["message"]


def test_an_empty_allow_list_refuses_every_url_and_says_how_to_allow() -> None:
    with pytest.raises(SuspectNotAllowed, match="forensics.allowed_suspect_urls"):
        SuspectAllowList(()).check("http://127.0.0.1:8000")
    with pytest.raises(VerifyError, match="not an http"):
        SuspectAllowList(("127.0.0.1",)).check("ftp://127.0.0.1/")
    SuspectAllowList(("[::1]",)).check("http://[::1]:9000/v1")


@pytest.mark.parametrize(
    "entry", ["ftp://host", "https://", "http://h/?q=1", "http://u:p@h", "a host", "h/x", ""]
)
def test_bad_allow_list_entries_are_config_errors(entry: str) -> None:
    with pytest.raises(ValidationError, match="allowed_suspect_urls"):
        Config.model_validate({"forensics": {"allowed_suspect_urls": [entry]}})

@pytest.mark.parametrize("seed", ["7", 7.0, -1, 2**63, True])
async def test_a_bad_chat_seed_is_a_422_naming_seed(client: httpx.AsyncClient, seed: Any) -> None:
    response = await client.post(
        "/admin/v1/verify/model",
        json={"url": "http://127.0.0.1:1/v1", "kind": "chat", "seed": seed},
        headers=AUTH,
    )
    assert response.status_code == 422, response.text
    assert error_of(response)["param"] == "seed"
