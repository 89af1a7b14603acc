"""Reading and checking the request body before anything is spent on it.

The body is read whole (inference requests are small and the size is capped), parsed once,
and checked by the protocol's :class:`~modelfence.gateway.apis.Api`; the model must be
routable *and* allowed for the key's tier. Nothing leaves for an upstream before this passes.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from modelfence.errors import BadRequest, PayloadTooLarge
from modelfence.gateway.apis import Api
from modelfence.gateway.context import context_of
from modelfence.gateway.routing import ModelAccess
from modelfence.operations import Operation
from modelfence.types import ASGIApp, Receive, Scope, Send


def content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError as exc:
                raise BadRequest("Content-Length is not a number") from exc
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = content_length(scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise OSError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class ReadRequest:
    def __init__(
        self,
        app: ASGIApp,
        *,
        apis: Mapping[Operation, Api],
        access: ModelAccess,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.apis = apis
        self.access = access
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        operation = ctx.operation
        assert operation is not None  # only inference routes are stacked on this stage
        raw = await read_body(scope, receive, self.max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
        parsed = self.apis[operation].parse(operation, ctx.path_model, body)
        ctx.upstream = self.access.upstream_for(parsed.model, ctx.tier)
        ctx.model = parsed.model  # only now: routable names keep the metrics label bounded
        ctx.body = body
        ctx.raw_body = raw
        ctx.parsed = parsed
        await self.app(scope, receive, send)
