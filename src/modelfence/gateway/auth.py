"""Who is calling: the API key, then the fingerprint of the connection behind it."""

from __future__ import annotations

from typing import Protocol

from modelfence.errors import AuthenticationError
from modelfence.gateway.context import context_of
from modelfence.identity.base import ApiKeyRecord, Fingerprint
from modelfence.types import ASGIApp, Receive, Scope, Send


class Authenticator(Protocol):
    async def authenticate(self, secret: str) -> ApiKeyRecord | None: ...


class Fingerprinter(Protocol):
    def compute(self, scope: Scope) -> Fingerprint: ...


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer":
                return None
            return token.strip() or None
    return None


class Authenticate:
    def __init__(self, app: ASGIApp, *, keys: Authenticator) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        secret = bearer_token(scope)
        if secret is None:
            raise AuthenticationError(
                "No API key provided: send it as 'Authorization: Bearer mf_...'.",
                code="missing_api_key",
            )
        record = await self.keys.authenticate(secret)
        if record is None:
            raise AuthenticationError("Incorrect API key provided.")
        if not record.active:
            raise AuthenticationError("This API key has been revoked.", code="revoked_api_key")
        context_of(scope).key = record
        await self.app(scope, receive, send)


class Fingerprinting:
    def __init__(self, app: ASGIApp, *, fingerprinter: Fingerprinter) -> None:
        self.app = app
        self.fingerprinter = fingerprinter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context_of(scope).fingerprint = self.fingerprinter.compute(scope)
        await self.app(scope, receive, send)
