"""OpenAI-style error bodies for the admin API, and the handlers that produce them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from modelfence.admin.schemas import ErrorResponse
from modelfence.errors import (
    AccountNotFound,
    GatewayError,
    KeyNotFound,
    NotFound,
    ServiceUnavailable,
    StoreError,
)

log = logging.getLogger(__name__)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's error statuses: ``responses=error_responses(404)``."""
    return {status: {"model": ErrorResponse} for status in statuses}


def error_response(
    status: int,
    message: str,
    *,
    type: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error = {"message": message, "type": type, "code": code, "param": param}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def gateway_error_response(exc: GatewayError) -> JSONResponse:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in exc.headers}
    return error_response(
        exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param, headers=headers
    )


async def _on_gateway_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return gateway_error_response(exc)


async def _on_store_error(_request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, KeyNotFound):
        return gateway_error_response(NotFound(str(exc), code="key_not_found"))
    if isinstance(exc, AccountNotFound):
        return gateway_error_response(NotFound(str(exc), code="account_not_found"))
    log.error("admin: key store failed: %s", exc)
    return gateway_error_response(
        ServiceUnavailable(
            "The key store is unavailable; try again later.", code="store_unavailable"
        )
    )


def invalid_field(loc: tuple[str, ...], message: str) -> RequestValidationError:
    """A 422 naming the body field at ``loc``, like pydantic's own validation errors."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", *loc), "msg": message, "input": None}]
    )


async def _on_invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error", "")
        message = f"The body is not valid JSON: {reason}"
        return error_response(422, message, type="invalid_request_error", code="invalid_json")
    # loc is ("body", "tier") or ("path", "key_id"); the first part is not a parameter.
    params = [".".join(str(part) for part in error["loc"][1:]) for error in errors]
    reasons = [error["msg"].removeprefix("Value error, ") for error in errors]
    message = "; ".join(
        f"{param}: {reason}" if param else reason for param, reason in zip(params, reasons)
    )
    return error_response(
        422, message, type="invalid_request_error", code="invalid_body", param=params[0] or None
    )


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own errors, raised before any route runs: unknown path, wrong method, and
    # a body it cannot decode.
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        message = f"{request.method} is not allowed here; allowed: {allowed}"
        return error_response(
            405,
            message,
            type="invalid_request_error",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot decode (not UTF-8): invalid JSON like any other.
        message = "The body is not valid JSON: it is not UTF-8 text"
        return error_response(422, message, type="invalid_request_error", code="invalid_json")
    code = {404: "not_found"}.get(exc.status_code, "invalid_request")
    return error_response(
        exc.status_code,
        str(exc.detail),
        type="invalid_request_error",
        code=code,
        headers=exc.headers,
    )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves on this path; Starlette's own 405 names only the
    first matching route's (GET and POST on one path are two routes)."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    )


EXCEPTION_HANDLERS = {
    GatewayError: _on_gateway_error,
    StoreError: _on_store_error,
    RequestValidationError: _on_invalid_request,
    HTTPException: _on_http_error,
}
