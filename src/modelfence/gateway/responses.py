"""Writing JSON and OpenAI-style error responses straight onto an ASGI ``send``."""

from __future__ import annotations

from typing import Any

import orjson

from modelfence.errors import GatewayError
from modelfence.types import Headers, Send

JSON_HEADERS: Headers = [(b"content-type", b"application/json")]


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Headers, content_type: bytes = b"application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: Any, headers: Headers | None = None) -> None:
    await send_bytes(send, status, orjson.dumps(payload), headers or [])


def error_payload(exc: GatewayError) -> dict[str, Any]:
    return {
        "error": {
            "message": exc.message,
            "type": exc.type,
            "param": exc.param,
            "code": exc.code,
        }
    }


async def send_error(send: Send, exc: GatewayError, headers: Headers | None = None) -> None:
    await send_json(send, exc.status, error_payload(exc), [*exc.headers, *(headers or [])])
