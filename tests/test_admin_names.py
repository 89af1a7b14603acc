"""Hostile client, entity and key names against a PostgreSQL-backed gateway.

PostgreSQL refuses NUL in text and more than 200 characters in ``client`` columns; such a
name must be turned away at the admin API as a client error naming the parameter, not
reach the database and come back as 503 ``store_unavailable`` or 500.
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from modelfence.testing.processes import GatewayProcess, ServiceProcess

from .conftest import base_config
from .test_admin_api import assert_every_response_declared

pytestmark = pytest.mark.postgres

BAD_NAMES = {
    "nul": "acme\x00x",
    "control": "acme\x01x",
    "newline": "acme\nx",
    "delete": "acme\x7fx",
    "c1-control": "acme\x85x",
    "too-long": "a" * 201,
    "empty": "",
}


def raw_request(
    gateway: GatewayProcess, method: str, path: str, body: bytes | None = None
) -> tuple[int, Any]:
    """``path`` is sent as given (already percent-encoded); ``body`` as raw bytes."""
    request = urllib.request.Request(gateway.url + path, data=body, method=method)
    request.add_header("authorization", f"Bearer {gateway.admin_token}")
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


@contextmanager
def private_database(postgres_url: str) -> Iterator[str]:
    """A new database on the shared server, dropped afterwards: no other run sees its rows."""
    name = f"mf_names_{secrets.token_hex(6)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(execute(f'DROP DATABASE "{name}" WITH (FORCE)'))


@contextmanager
def private_gateway(
    postgres_url: str, workdir: Path, upstream: ServiceProcess, name: str
) -> Iterator[GatewayProcess]:
    """A gateway on the fake upstream whose store is a :func:`private_database`."""
    with private_database(postgres_url) as store:
        config = {**base_config(upstream.url, workdir), "store": store}
        with GatewayProcess(config, workdir, name=name) as proc:
            yield proc


@pytest.fixture(scope="module")
def gateway(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory, fake_upstream: ServiceProcess
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("names")
    with private_gateway(postgres_url, workdir, fake_upstream, "names") as proc:
        yield proc


def assert_rejected(status: int, body: Any, param: str) -> None:
    assert status == 422, (status, body)
    assert body["error"]["type"] == "invalid_request_error", body
    assert body["error"]["param"] == param, body


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_client_names_in_bodies_are_refused(gateway: GatewayProcess, name: str) -> None:
    status, body = raw_request(gateway, "POST", "/admin/v1/keys", orjson.dumps({"client": name}))
    assert_rejected(status, body, "client")


def test_a_lone_surrogate_is_refused(gateway: GatewayProcess) -> None:
    # Valid JSON, but no UTF-8 encoding exists for it: the database driver would fail.
    status, body = raw_request(gateway, "POST", "/admin/v1/keys", b'{"client": "a\\ud800"}')
    assert_rejected(status, body, "client")


PATH_ROUTES = [
    ("GET", "/admin/v1/clients/{}", None, "client"),
    ("POST", "/admin/v1/clients/{}/action", {"action": "block"}, "client"),
    ("GET", "/admin/v1/entities/{}", None, "entity"),
    ("PUT", "/admin/v1/risk/{}", {"level": "high"}, "client"),
    ("DELETE", "/admin/v1/risk/{}", None, "client"),
    ("GET", "/admin/v1/keys/{}", None, "key_id"),
    ("PUT", "/admin/v1/keys/{}/limits", {}, "key_id"),
]


@pytest.mark.parametrize(("method", "template", "body", "param"), PATH_ROUTES)
@pytest.mark.parametrize("name", ["acme\x00x", "acme\x01x", "a" * 201], ids=["nul", "ctl", "long"])
def test_bad_names_in_paths_are_refused(
    gateway: GatewayProcess, method: str, template: str, body: Any, param: str, name: str
) -> None:
    data = None if body is None else orjson.dumps(body)
    status, answer = raw_request(gateway, method, template.format(quoted(name)), data)
    assert_rejected(status, answer, param)


def test_bad_names_in_other_fields_are_refused(gateway: GatewayProcess) -> None:
    client = f"names-{secrets.token_hex(4)}"
    status, body = raw_request(
        gateway,
        "POST",
        f"/admin/v1/clients/{client}/action",
        orjson.dumps({"action": "block", "note": "why\x00"}),
    )
    assert_rejected(status, body, "note")
    status, body = raw_request(
        gateway,
        "POST",
        "/admin/v1/verify/model",
        orjson.dumps({"url": "http://127.0.0.1:1", "kind": "chat", "client": "a\x00"}),
    )
    assert_rejected(status, body, "client")


def test_refused_names_change_nothing_and_good_names_still_work(
    gateway: GatewayProcess,
) -> None:
    before = raw_request(gateway, "GET", "/admin/v1/keys")
    for name in BAD_NAMES.values():
        raw_request(gateway, "POST", "/admin/v1/keys", orjson.dumps({"client": name}))
        if name:
            raw_request(gateway, "PUT", f"/admin/v1/risk/{quoted(name)}", b'{"level": "high"}')
    assert raw_request(gateway, "GET", "/admin/v1/keys") == before
    assert raw_request(gateway, "GET", "/admin/v1/risk") == (200, {"data": {}})
    # Names are otherwise free-form: spaces, accents, punctuation, 200 characters.
    for name in (f"Acme Café {secrets.token_hex(4)}", "é" * 190 + secrets.token_hex(5)):
        status, created = raw_request(
            gateway, "POST", "/admin/v1/keys", orjson.dumps({"client": name})
        )
        assert status == 201 and created["client"] == name, created
        status, record = raw_request(
            gateway,
            "POST",
            f"/admin/v1/clients/{quoted(name)}/action",
            orjson.dumps({"action": "alert", "note": "line 1\nline 2"}),
        )
        assert status == 200 and record["client"] == name, record
        status, record = raw_request(gateway, "GET", f"/admin/v1/clients/{quoted(name)}")
        assert status == 200 and record["override"] == "alert", record


def test_unknown_query_parameters_are_refused(gateway: GatewayProcess) -> None:
    for path, param in (
        ("/admin/v1/alerts?limt=5", "limt"),
        ("/admin/v1/clients?limit=5&min_rsk=0.5", "min_rsk"),
    ):
        status, body = raw_request(gateway, "GET", path)
        assert_rejected(status, body, param)


def test_openapi_declares_every_response_of_every_admin_route(gateway: GatewayProcess) -> None:
    status, schema = raw_request(gateway, "GET", "/admin/openapi.json")
    assert status == 200
    assert {"/v1/clients/{client}", "/v1/risk/{client}", "/v1/verify/model"} <= set(schema["paths"])
    assert_every_response_declared(schema)


def test_the_gateway_and_its_admin_api_answer_405_with_allow(gateway: GatewayProcess) -> None:
    for method, path, allow in (
        ("GET", "/v1/chat/completions", "POST"),
        ("POST", "/admin/v1/risk/acme", "DELETE, PUT"),
    ):
        request = urllib.request.Request(gateway.url + path, method=method)
        request.add_header("authorization", f"Bearer {gateway.admin_token}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        refused.value.close()
        assert refused.value.code == 405 and refused.value.headers["allow"] == allow
