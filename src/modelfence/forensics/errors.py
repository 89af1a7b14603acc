"""Errors a verification reports to its caller (CLI message, admin API and console 4xx/5xx)."""

from __future__ import annotations

import logging

from modelfence.errors import (
    BadRequest,
    GatewayError,
    ModelFenceError,
    PermissionDenied,
    UpstreamError,
)

log = logging.getLogger(__name__)


class VerifyError(ModelFenceError):
    """Bad input to a verification: empty text, wrong kind, nothing recorded to test."""


class SuspectUnreachable(VerifyError):
    """The suspect model's URL did not answer as the chosen kind of API."""


class SuspectNotAllowed(VerifyError):
    """The admin API may not query this suspect URL: the config does not list it."""


class MissingDependency(VerifyError):
    """A verification needs an optional part that is not installed; says what to install."""


class NotInstalled(GatewayError):
    status = 501
    type = "server_error"
    code = "missing_dependency"


def translated(exc: VerifyError) -> GatewayError:
    """The answer to a failed verification: 501 missing part, 403 suspect not allowed, 502
    suspect unreachable, 400 anything else; the message is the error's."""
    if isinstance(exc, MissingDependency):
        log.error("verification impossible on this install: %s", exc)
        return NotInstalled(str(exc))
    if isinstance(exc, SuspectNotAllowed):
        return PermissionDenied(str(exc), code="suspect_not_allowed", param="url")
    if isinstance(exc, SuspectUnreachable):
        return UpstreamError(str(exc), code="suspect_unreachable")
    return BadRequest(str(exc), code="verification_failed")
