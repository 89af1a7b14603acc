"""The one exception tree of ModelFence.

    ModelFenceError
    ├── ConfigError               bad configuration; the message names the key path
    ├── StoreError                the state database failed or is unreachable
    │   ├── KeyNotFound           no API key with that id
    │   └── AccountNotFound       no account with that id
    ├── KeyLookupDeferred         a key in no key index, over the budget of lookups
    ├── LimitBackendError         the shared limit backend (Redis) failed
    └── GatewayError              anything the gateway answers with an HTTP error
        ├── BadRequest            400 invalid_request_error
        │   ├── PayloadTooLarge   413
        │   └── HeadersTooLarge   431
        ├── AuthenticationError   401
        ├── PermissionDenied      403
        ├── NotFound              404 (route or model)
        ├── RateLimited           429, with Retry-After
        ├── ServiceUnavailable    503
        ├── UpstreamError         502
        └── UpstreamTimeout       504

Foreign errors (Redis, aiohttp, SQLAlchemy) are translated where they enter, with
``raise ... from exc``, so callers only ever catch these.
"""

from __future__ import annotations


class ModelFenceError(Exception):
    """Base of every error ModelFence raises on purpose."""


class ConfigError(ModelFenceError):
    """The configuration is invalid; ``str()`` names the key, the value and what is allowed."""


class StoreError(ModelFenceError):
    """The state database (SQLite or PostgreSQL) failed."""


class KeyLookupDeferred(ModelFenceError):
    """A key this replica's key index does not hold was not looked up: the lookups of such
    keys (made-up ones, or one created since the last poll) are over their budget."""


class KeyNotFound(StoreError):
    """No API key with the given id exists."""


class AccountNotFound(StoreError):
    """No account with the given id exists."""


class LimitBackendError(ModelFenceError):
    """The shared limit backend failed; the guard decides open/closed/degraded."""


class GatewayError(ModelFenceError):
    """An error answered to the client as OpenAI-style JSON with an HTTP status."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or []


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class HeadersTooLarge(BadRequest):
    status = 431
    code = "headers_too_large"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"
