"""The endpoint of the inference routes: forward to the upstream, relay the answer.

Plain responses are relayed whole; streams chunk by chunk as they arrive, with
``X-Accel-Buffering: no`` so that proxies in front do not buffer them either. The client's
own credentials never travel upstream, nor its path or query string: the upstream path is
built from the operation's route template and the validated model name, and the upstream
body here, once, from the client's body and the stages' overrides. A client that
disconnects mid-stream stops the upstream read at the next chunk, which ends the request
and releases its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import orjson

from modelfence.errors import BadRequest, UpstreamError, UpstreamTimeout
from modelfence.gateway.apis import usage_from_response
from modelfence.gateway.context import RequestContext, Usage, context_of
from modelfence.gateway.sse import BOM
from modelfence.gateway.streaming import SSETap
from modelfence.gateway.upstream import Transport, UpstreamRequest, UpstreamResponse
from modelfence.operations import Operation
from modelfence.policy.request_policy import upstream_payload
from modelfence.telemetry.metrics import Metrics
from modelfence.types import Receive, Scope, Send

_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def upstream_body(ctx: RequestContext) -> bytes:
    """The body to send upstream: the client's with the stages' overrides, and
    include_usage on streams (settlement needs the upstream's count). An Open Inference
    Protocol body is always written from what the gateway read: its servers (Triton,
    OpenVINO) take the first of a repeated key where orjson took the last, so the client's
    bytes could ask them for what the gateway checked and refused."""
    parsed = ctx.parsed
    assert parsed is not None  # ReadRequest runs first
    overrides = ctx.upstream_overrides
    if parsed.stream and parsed.operation.generates_text and not parsed.wants_usage_chunk:
        options = ctx.body.get("stream_options") or {}
        overrides = {**overrides, "stream_options": {**options, "include_usage": True}}
    if not overrides and parsed.operation is not Operation.OIP_INFER:
        return ctx.raw_body
    try:
        return orjson.dumps(upstream_payload(ctx.body, overrides) if overrides else ctx.body)
    except orjson.JSONEncodeError as exc:  # orjson reads 1,024 levels but writes 254
        raise BadRequest("the request body is nested deeper than 254 levels, which the "
                         "gateway does not forward") from exc


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Proxy:
    def __init__(self, *, transports: Mapping[str, Transport], metrics: Metrics) -> None:
        self.transports = transports
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        transport = self.transports[ctx.upstream]
        assert ctx.parsed is not None  # ReadRequest runs first
        path = ctx.parsed.operation.upstream_path(ctx.parsed.model)
        request = UpstreamRequest("POST", path, upstream_body(ctx), headers=ctx.upstream_headers)
        response = await self._call(transport, request)
        try:
            if response.status >= 500:
                self.metrics.upstream_error(transport.name, f"status_{response.status}")
                raise UpstreamError(
                    f"upstream {transport.name!r} failed with status {response.status}"
                )
            content_type = dict(response.headers).get(b"content-type", b"").lower()
            if ctx.parsed is not None and ctx.parsed.stream and content_type.startswith(
                b"text/event-stream"
            ):
                await self._relay_stream(ctx, response, receive, send)
            else:
                await self._relay_whole(ctx, response, send)
        finally:
            response.close()

    async def _call(self, transport: Transport, request: UpstreamRequest) -> UpstreamResponse:
        try:
            return await transport.send(request)
        except UpstreamTimeout:
            self.metrics.upstream_error(transport.name, "timeout")
            raise
        except UpstreamError:
            self.metrics.upstream_error(transport.name, "unreachable")
            raise

    async def _relay_whole(self, ctx: RequestContext, response: UpstreamResponse, send: Send) -> None:
        content_type = dict(response.headers).get(b"content-type", b"application/json")
        body = await response.read()
        if b"json" in content_type.lower():
            # JSON readers skip an opening byte-order mark; orjson, and so every stage after
            # this one, would not, and the answer would pass them unread.
            body = body.removeprefix(BOM)
        if response.status == 200 and ctx.parsed is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                usage = usage_from_response(orjson.loads(body))
                if usage is not None:
                    ctx.usage = Usage(*usage)
        if ctx.usage is None:
            ctx.usage = Usage(prompt_tokens=ctx.parsed.prompt_tokens if ctx.parsed else 0)
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_stream(
        self, ctx: RequestContext, response: UpstreamResponse, receive: Receive, send: Send
    ) -> None:
        assert ctx.parsed is not None
        tap = SSETap(strip_usage=not ctx.parsed.wants_usage_chunk)
        watcher = asyncio.ensure_future(_disconnected(receive))
        await send({"type": "http.response.start", "status": response.status, "headers": _STREAM_HEADERS})
        try:
            async for chunk in response.chunks():
                if watcher.done():
                    ctx.outcome = "client_closed"
                    break
                out = tap.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": tap.flush(), "more_body": False})
        except UpstreamError:
            self.metrics.upstream_error(ctx.upstream, "broken_stream")
            error = {"error": {"message": "the upstream stream broke off", "type": "server_error",
                               "code": "upstream_error"}}
            await send({"type": "http.response.body",
                        "body": b"data: " + orjson.dumps(error) + b"\n\n", "more_body": False})
            ctx.outcome = "upstream_error"
        finally:
            watcher.cancel()
            prompt, completion = tap.usage or (ctx.parsed.prompt_tokens, tap.content_events)
            ctx.usage = Usage(prompt, completion)
