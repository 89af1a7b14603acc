"""Who is calling: the API key, then the fingerprint of the connection behind it."""

from __future__ import annotations

from typing import Protocol

from modelfence.errors import (
    AuthenticationError,
    KeyLookupDeferred,
    ServiceUnavailable,
    StoreError,
)
from modelfence.gateway.context import context_of
from modelfence.identity.base import ApiKeyRecord, Fingerprint
from modelfence.identity.failures import AuthFailures
from modelfence.types import ASGIApp, Receive, Scope, Send

RETRY = [(b"retry-after", b"1")]


class Authenticator(Protocol):
    def cached(self, secret: str) -> ApiKeyRecord | None: ...

    def lookup_pending(self, secret: str) -> bool: ...

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
    """Resolves the bearer key; a client address that keeps presenting wrong keys gets 429.

    Keys this replica already knows are served from memory whatever the address; any other
    key is charged to the address before it is looked up, so a flood of random keys costs
    at most ``failures``' allowance in store lookups per address.
    """

    def __init__(self, app: ASGIApp, *, keys: Authenticator, failures: AuthFailures) -> None:
        self.app = app
        self.keys = keys
        self.failures = failures

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        secret = bearer_token(scope)
        if secret is None:
            raise AuthenticationError(
                "No API key provided: send it as 'Authorization: Bearer mf_...'.",
                code="missing_api_key",
            )
        record = self.keys.cached(secret) or await self._look_up(scope, secret)
        if not record.active:
            raise AuthenticationError("This API key has been revoked.", code="revoked_api_key")
        context_of(scope).key = record
        await self.app(scope, receive, send)

    async def _look_up(self, scope: Scope, secret: str) -> ApiKeyRecord:
        if (refusal := self.failures.check(scope)) is not None:
            raise refusal
        if self.keys.lookup_pending(secret):
            # Joins a lookup already charged: a burst carrying one new key costs one charge.
            record = await self._authenticate(secret)
            if record is None:
                self.failures.failed(self.failures.charge(scope), "unknown API key")
                raise AuthenticationError("Incorrect API key provided.")
            return record
        source = self.failures.charge(scope)
        try:
            record = await self._authenticate(secret)
        except BaseException:
            self.failures.forgive(source)  # the store failed (503) or the client left
            raise
        if record is None:
            self.failures.failed(source, "unknown API key")
            raise AuthenticationError("Incorrect API key provided.")
        self.failures.forgive(source)
        return record

    async def _authenticate(self, secret: str) -> ApiKeyRecord | None:
        """The key's record; a key that could not be checked now is a 503, never a 401."""
        try:
            return await self.keys.authenticate(secret)
        except KeyLookupDeferred as exc:
            raise ServiceUnavailable(str(exc), code="key_lookup_deferred", headers=RETRY) from exc
        except StoreError as exc:
            raise ServiceUnavailable(
                "the key store is unavailable and this key is not cached here; retry shortly",
                code="key_store_unavailable",
                headers=RETRY,
            ) from exc


class Fingerprinting:
    def __init__(self, app: ASGIApp, *, fingerprinter: Fingerprinter) -> None:
        self.app = app
        self.fingerprinter = fingerprinter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context_of(scope).fingerprint = self.fingerprinter.compute(scope)
        await self.app(scope, receive, send)
