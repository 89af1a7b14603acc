"""The upstream transport against a real HTTP server: what the upstream sees, and that an
upstream which compresses when asked hands the gateway plain bytes it can parse and relay."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from modelfence import __version__
from modelfence.gateway.upstream import AiohttpTransport, UpstreamRequest, upstream_session

ANSWER = {"choices": [{"message": {"role": "assistant", "content": "hello " * 200}}]}


async def echo(request: web.Request) -> web.Response:
    """Answers with the request's headers; compressed whenever the request accepts gzip."""
    seen = {name.lower(): value for name, value in request.headers.items()}
    response = web.Response(body=orjson.dumps({**ANSWER, "seen": seen}),
                            content_type="application/json")
    response.enable_compression()  # aiohttp compresses only what the request accepts
    return response


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_the_upstream_gets_plain_json_and_only_our_headers(upstream_url: str) -> None:
    session = upstream_session()
    transport = AiohttpTransport("up", upstream_url, session, api_key="sk-upstream")
    try:
        response = await transport.send(UpstreamRequest(
            "POST", "/v1/chat/completions", b"{}", headers=(("x-modelfence-mark", "m1"),)
        ))
        raw = await response.read()
        response.close()
    finally:
        await session.close()
    answer = orjson.loads(raw)  # not gzip: the gateway parses and rewrites answers
    assert answer["choices"] == ANSWER["choices"]
    seen = answer["seen"]
    assert seen["accept-encoding"] == "identity"
    assert seen["user-agent"] == f"modelfence/{__version__}"
    assert seen["authorization"] == "Bearer sk-upstream"
    assert seen["content-type"] == "application/json"
    assert seen["x-modelfence-mark"] == "m1"
    assert seen["accept"] == "*/*"
