"""The outermost stage: request id, size guard on headers, errors to JSON, metrics.

Everything inside may raise :class:`GatewayError`; here it becomes an OpenAI-style error
response. Anything else is a bug: it is logged with a traceback and answered with a plain
500 that reveals nothing. Every request ends in exactly one metrics observation.
"""

from __future__ import annotations

import logging
import secrets
import time
from itertools import count

from modelfence.errors import GatewayError, HeadersTooLarge
from modelfence.gateway.context import SCOPE_KEY, RequestContext
from modelfence.gateway.responses import send_error
from modelfence.telemetry.metrics import Metrics
from modelfence.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("modelfence.gateway")

_REQUEST_ID_PREFIX = secrets.token_hex(4)


def outcome_for(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 401:
        return "unauthorized"
    if status == 429:
        return "rate_limited"
    if status in (502, 504):
        return "upstream_error"
    if status == 503:
        return "unavailable"
    if status < 500:
        return "client_error"
    return "error"


class ErrorBoundary:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_header_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_header_bytes = max_header_bytes
        self._ids = count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{_REQUEST_ID_PREFIX}{next(self._ids):x}"
        ctx = RequestContext(route="unmatched", started=time.perf_counter(), request_id=request_id)
        scope[SCOPE_KEY] = ctx
        status = 0
        id_header = (b"x-request-id", request_id.encode())

        async def send_tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            if sum(len(name) + len(value) for name, value in scope["headers"]) > self.max_header_bytes:
                raise HeadersTooLarge(f"request headers exceed {self.max_header_bytes} bytes")
            await self.app(scope, receive, send_tracked)
        except GatewayError as exc:
            if status:
                log.warning("%s after the response started: %s", type(exc).__name__, exc.message)
            else:
                await send_error(send_tracked, exc)
        except OSError:  # the client went away while we were writing to it
            ctx.outcome = "client_closed"
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not status:
                await send_error(
                    send_tracked,
                    GatewayError(f"internal error; request id {request_id}"),
                )
        finally:
            outcome = ctx.outcome if ctx.outcome != "ok" else outcome_for(status or 500)
            self.metrics.observe_request(
                ctx.route, ctx.model, ctx.tier, outcome, time.perf_counter() - ctx.started
            )
