"""Errors a verification reports to its caller (CLI message, admin API 400/502)."""

from __future__ import annotations

from modelfence.errors import ModelFenceError


class VerifyError(ModelFenceError):
    """Bad input to a verification: empty text, wrong kind, nothing recorded to test."""


class SuspectUnreachable(VerifyError):
    """The suspect model's URL did not answer as the chosen kind of API."""


class SuspectNotAllowed(VerifyError):
    """The admin API may not query this suspect URL: the config does not list it."""


class MissingDependency(VerifyError):
    """A verification needs an optional part that is not installed; says what to install."""
