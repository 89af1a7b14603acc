"""The admin token check, in front of the whole admin application."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection

from starlette.datastructures import Headers

from modelfence.admin.errors import gateway_error_response
from modelfence.errors import AuthenticationError, GatewayError, ServiceUnavailable
from modelfence.identity.failures import AuthFailures
from modelfence.types import ASGIApp, Receive, Scope, Send


class RequireAdminToken:
    """Checks the admin token before FastAPI sees the request.

    A middleware rather than a dependency: FastAPI reads and parses the body before
    dependencies run, so an anonymous caller could make it parse bodies and would get
    422s instead of 401s. The OpenAPI document stays public.

    Tokens are compared as SHA-256 digests in constant time, so neither the content nor
    the length of the token leaks through timing. A client address that keeps guessing is
    refused (429) before its next guess is even compared, and every wrong token is counted
    and logged with the address (``failures``).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: bytes | None,
        public_paths: Collection[str],
        failures: AuthFailures,
        label: str = "admin token",
        setting: str = "`admin_token` in the config or the MODELFENCE_ADMIN_TOKEN environment variable",
        title: str = "The admin API",
    ) -> None:
        self.app = app
        self.token_digest = None if token is None else hashlib.sha256(token).digest()
        self.public_paths = frozenset(public_paths)
        self.failures = failures
        # The key broker's routes use the same check with a token of their own.
        self.label, self.setting, self.title = label, setting, title

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route_path = scope["path"].removeprefix(scope.get("root_path", ""))
            refusal = None if route_path in self.public_paths else self._refusal(scope)
            if refusal is not None:
                await gateway_error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> GatewayError | None:
        if self.token_digest is None:
            return ServiceUnavailable(
                f"{self.title} is disabled: set {self.setting}.",
                code="admin_disabled",
            )
        challenge = [(b"www-authenticate", b"Bearer")]
        authorization = Headers(scope=scope).get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return AuthenticationError(
                f"No {self.label} provided: send it as 'Authorization: Bearer <token>'.",
                code="missing_admin_token",
                headers=challenge,
            )
        if (refusal := self.failures.check(scope)) is not None:
            return refusal
        source = self.failures.charge(scope)
        digest = hashlib.sha256(token.strip().encode()).digest()
        if not hmac.compare_digest(digest, self.token_digest):
            self.failures.failed(source, f"incorrect {self.label}")
            return AuthenticationError(
                f"Incorrect {self.label}.", code="invalid_admin_token", headers=challenge
            )
        self.failures.forgive(source)
        return None
