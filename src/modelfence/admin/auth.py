"""The admin token check, in front of the whole admin application."""

from __future__ import annotations

import hmac
from collections.abc import Collection

from starlette.datastructures import Headers

from modelfence.admin.errors import gateway_error_response
from modelfence.errors import AuthenticationError, GatewayError, ServiceUnavailable
from modelfence.types import ASGIApp, Receive, Scope, Send


class RequireAdminToken:
    """Checks the admin token before FastAPI sees the request.

    A middleware rather than a dependency: FastAPI reads and parses the body before
    dependencies run, so an anonymous caller could make it parse bodies and would get
    422s instead of 401s. The OpenAPI document stays public.
    """

    def __init__(self, app: ASGIApp, *, token: bytes | None, public_paths: Collection[str]) -> None:
        self.app = app
        self.token = token
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route_path = scope["path"].removeprefix(scope.get("root_path", ""))
            refusal = None if route_path in self.public_paths else self._refusal(scope)
            if refusal is not None:
                await gateway_error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> GatewayError | None:
        if self.token is None:
            return ServiceUnavailable(
                "The admin API is disabled: set `admin_token` in the config or the "
                "MODELFENCE_ADMIN_TOKEN environment variable.",
                code="admin_disabled",
            )
        challenge = [(b"www-authenticate", b"Bearer")]
        authorization = Headers(scope=scope).get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return AuthenticationError(
                "No admin token provided: send it as 'Authorization: Bearer <token>'.",
                code="missing_admin_token",
                headers=challenge,
            )
        if not hmac.compare_digest(token.strip().encode(), self.token):
            return AuthenticationError(
                "Incorrect admin token.", code="invalid_admin_token", headers=challenge
            )
        return None
