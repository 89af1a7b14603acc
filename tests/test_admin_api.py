"""The admin API, mounted at /admin as app.py mounts it, called in-process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.admin import create_admin_app
from modelfence.identity import KeyStore, ServerSecret, SqlKeyStore
from modelfence.store import create_tables, open_engine

from .test_auth_failures import admin_failures
from .test_store_database import scratch_engine

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = ServerSecret(b"test-secret-0123456789abcdef")
TIERS = ("default", "pro")


def client_for(store: KeyStore, admin_token: str | None = TOKEN) -> httpx.AsyncClient:
    admin = create_admin_app(
        store=store, admin_token=admin_token, tiers=TIERS, failures=admin_failures(1000)
    )
    gateway = Starlette(routes=[Mount("/admin", app=admin)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlKeyStore]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield SqlKeyStore(engine, SECRET)


@pytest.fixture
async def client(store: SqlKeyStore) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(store) as client:
        yield client


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    assert {"message", "type", "code"} <= error.keys()
    return error


ROUTES = [
    ("POST", "/admin/v1/keys", {"client": "acme"}),
    ("GET", "/admin/v1/keys", None),
    ("GET", "/admin/v1/keys/key_000000000000", None),
    ("DELETE", "/admin/v1/keys/key_000000000000", None),
    ("POST", "/admin/v1/keys/key_000000000000/revoke", None),
    ("PUT", "/admin/v1/keys/key_000000000000/limits", {}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_needs_the_admin_token(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    missing = await client.request(method, path, json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert error_of(missing)["code"] == "missing_admin_token"
    wrong = await client.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and error_of(wrong)["type"] == "authentication_error"
    basic = await client.request(
        method, path, json=body, headers={"Authorization": f"Basic {TOKEN}"}
    )
    assert basic.status_code == 401


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_without_a_configured_token_every_route_is_503(
    store: SqlKeyStore, method: str, path: str, body: Any
) -> None:
    async with client_for(store, admin_token=None) as client:
        response = await client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 503
    assert "MODELFENCE_ADMIN_TOKEN" in error_of(response)["message"]


async def test_create_list_limit_and_revoke(
    client: httpx.AsyncClient, store: SqlKeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await client.post(
        "/admin/v1/keys", json={"client": "acme", "tier": "pro"}, headers=AUTH
    )
    assert created.status_code == 201
    key = created.json()
    assert key["client"] == "acme" and key["tier"] == "pro" and key["active"]
    assert key["api_key"].startswith(key["prefix"])
    assert await store.find_by_secret(key["api_key"]) is not None

    listed = (await client.get("/admin/v1/keys", headers=AUTH)).json()["data"]
    assert [k["key_id"] for k in listed] == [key["key_id"]]
    assert "api_key" not in listed[0] and "key_hash" not in listed[0]
    assert key["api_key"] not in (await client.get("/admin/v1/keys", headers=AUTH)).text

    limits = {"requests_per_minute": 5, "concurrent_requests": 2}
    updated = await client.put(f"/admin/v1/keys/{key['key_id']}/limits", json=limits, headers=AUTH)
    assert updated.status_code == 200
    assert updated.json()["limits"] == {**dict.fromkeys(key["limits"]), **limits}

    revoked = await client.post(f"/admin/v1/keys/{key['key_id']}/revoke", headers=AUTH)
    assert revoked.status_code == 200 and not revoked.json()["active"]
    again = await client.delete(f"/admin/v1/keys/{key['key_id']}", headers=AUTH)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    fetched = await client.get(f"/admin/v1/keys/{key['key_id']}", headers=AUTH)
    assert fetched.json() == again.json()
    assert key["key_id"] in caplog.text  # audited, but the key itself is never logged
    assert key["api_key"] not in caplog.text and key["api_key"][10:20] not in caplog.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/admin/v1/keys", {"client": "acme", "tier": "gold"}, "tier"),
        ("/admin/v1/keys", {"client": ""}, "client"),
        ("/admin/v1/keys", {"tier": "pro"}, "client"),
        ("/admin/v1/keys", {"client": "acme", "owner": "x"}, "owner"),
        ("/admin/v1/keys", {"client": 7}, "client"),
    ],
)
async def test_bad_create_bodies_are_422(
    client: httpx.AsyncClient, path: str, body: Any, param: str
) -> None:
    response = await client.post(path, json=body, headers=AUTH)
    assert response.status_code == 422
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


async def test_an_unknown_tier_names_the_allowed_ones(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/admin/v1/keys", json={"client": "a", "tier": "gold"}, headers=AUTH
    )
    assert "allowed: default, pro" in error_of(response)["message"]


@pytest.mark.parametrize(
    "limits",
    [
        {"requests_per_minute": 0},
        {"tokens_per_minute": -5},
        {"concurrent_requests": 1.5},
        {"usd_per_day": "10"},
        {"requests_per_minute": True},
        {"requests_per_day": 10},
    ],
)
async def test_bad_limits_are_422(
    client: httpx.AsyncClient, store: SqlKeyStore, limits: dict[str, Any]
) -> None:
    record, _ = await store.create("acme", "default")
    response = await client.put(f"/admin/v1/keys/{record.key_id}/limits", json=limits, headers=AUTH)
    assert response.status_code == 422
    assert error_of(response)["param"] == next(iter(limits))


async def test_a_body_that_is_not_utf8_is_invalid_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/admin/v1/keys", content=b'{"client": "\xff\xfe"}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_json"


async def test_invalid_json_is_422_once_authenticated(client: httpx.AsyncClient) -> None:
    json_type = {"content-type": "application/json"}
    response = await client.post("/admin/v1/keys", content=b"{nope", headers={**AUTH, **json_type})
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_json"
    anonymous = await client.post("/admin/v1/keys", content=b"{nope", headers=json_type)
    assert anonymous.status_code == 401  # the token is checked before the body is read


@pytest.mark.parametrize(
    ("method", "path", "body"), [r for r in ROUTES if "key_000000000000" in r[1]]
)
async def test_unknown_keys_are_404(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 404 and error_of(response)["code"] == "key_not_found"


async def test_unknown_routes_are_openai_style_errors(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/v1/nothing", headers=AUTH)
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    response = await client.patch("/admin/v1/keys", headers=AUTH)
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"
    response = await client.get("/admin/v1/keys/", headers=AUTH)
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PATCH", "/admin/v1/keys", "GET, POST"),
        ("DELETE", "/admin/v1/keys", "GET, POST"),
        ("POST", "/admin/v1/keys/key_000000000000", "DELETE, GET"),
        ("GET", "/admin/v1/keys/key_000000000000/limits", "PUT"),
        ("PUT", "/admin/openapi.json", "GET, HEAD"),
    ],
)
async def test_a_wrong_method_is_405_naming_every_allowed_method(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    response = await client.request(method, path, headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == allow
    assert error_of(response)["code"] == "method_not_allowed"
    assert allow in error_of(response)["message"]


async def test_a_store_outage_is_503(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'state.db'}")
    try:
        async with client_for(SqlKeyStore(engine, SECRET)) as client:
            listed = await client.get("/admin/v1/keys", headers=AUTH)
            created = await client.post("/admin/v1/keys", json={"client": "a"}, headers=AUTH)
        for response in (listed, created):
            assert response.status_code == 503
            assert error_of(response)["code"] == "store_unavailable"
    finally:
        await engine.dispose()


async def test_openapi_is_served_and_describes_the_routes(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert {server["url"] for server in schema.get("servers", [])} == {"/admin"}
    assert set(schema["paths"]) == {
        "/v1/keys",
        "/v1/keys/{key_id}",
        "/v1/keys/{key_id}/revoke",
        "/v1/keys/{key_id}/limits",
    }
    assert set(schema["paths"]["/v1/keys/{key_id}"]) == {"get", "delete"}
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    create = schema["paths"]["/v1/keys"]["post"]
    assert {"201", "401", "422", "503"} <= set(create["responses"])
    error_schema = create["responses"]["422"]["content"]["application/json"]["schema"]
    assert error_schema["$ref"].endswith("/ErrorResponse")


async def test_openapi_declares_every_response_with_a_schema(client: httpx.AsyncClient) -> None:
    assert_every_response_declared((await client.get("/admin/openapi.json")).json())


def assert_every_response_declared(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"401", "503"} <= set(responses), (method, path)
            if operation.get("parameters") or operation.get("requestBody"):
                assert "422" in responses, (method, path)
            for status, response in responses.items():
                body = response.get("content", {}).get("application/json", {}).get("schema")
                assert body and body != {}, (method, path, status)
