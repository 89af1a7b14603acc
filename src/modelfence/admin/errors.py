"""OpenAI-style error bodies for the admin API, and the handlers that produce them."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from modelfence.errors import GatewayError, KeyNotFound, NotFound, ServiceUnavailable, StoreError

log = logging.getLogger(__name__)


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


async def _on_store_error(_request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, KeyNotFound):
        return gateway_error_response(NotFound(str(exc), code="key_not_found"))
    log.error("admin: key store failed: %s", exc)
    return gateway_error_response(
        ServiceUnavailable(
            "The key store is unavailable; try again later.", code="store_unavailable"
        )
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
    message = "; ".join(
        f"{param}: {error['msg']}" if param else error["msg"]
        for param, error in zip(params, errors)
    )
    return error_response(
        422, message, type="invalid_request_error", code="invalid_body", param=params[0] or None
    )


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    # Routing errors (unknown path, wrong method), raised before any route runs.
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return error_response(
        exc.status_code,
        str(exc.detail),
        type="invalid_request_error",
        code=code,
        headers=exc.headers,
    )


EXCEPTION_HANDLERS = {
    StoreError: _on_store_error,
    RequestValidationError: _on_invalid_request,
    HTTPException: _on_http_error,
}
