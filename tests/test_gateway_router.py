"""Path dispatch: unknown paths are 404, known paths with a wrong method 405 with ``Allow``."""

from __future__ import annotations

import time

import pytest

from modelfence.errors import NotFound
from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.router import MethodNotAllowed, Router
from modelfence.types import Receive, Scope, Send


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


ROUTER = Router(
    {
        ("POST", "/v1/chat/completions"): ok,
        ("GET", "/v2/health/ready"): ok,
        ("HEAD", "/v2/health/ready"): ok,
        ("GET", "/v2/models/{name}"): ok,
        ("POST", "/v2/models/{name}/infer"): ok,
    },
    mounts={},
)


async def call(method: str, path: str) -> None:
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [],
        SCOPE_KEY: RequestContext(route="unmatched", started=time.perf_counter(), request_id="r"),
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, object]) -> None:
        pass

    await ROUTER(scope, receive, send)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v2/health/ready", "GET, HEAD"),
        ("POST", "/v2/models/digits", "GET"),
        ("GET", "/v2/models/digits/infer", "POST"),
    ],
)
async def test_a_wrong_method_is_405_with_allow(method: str, path: str, allow: str) -> None:
    with pytest.raises(MethodNotAllowed) as refused:
        await call(method, path)
    assert refused.value.status == 405
    assert dict(refused.value.headers) == {b"allow": allow.encode()}
    assert method in refused.value.message and allow in refused.value.message


async def test_an_unknown_path_is_404_and_a_known_one_is_served() -> None:
    with pytest.raises(NotFound):
        await call("GET", "/v1/nothing")
    await call("POST", "/v2/models/digits/infer")
