"""The operator console: a server-rendered web page for the analyst in an incident.

``app.py`` mounts it at ``/console`` only when an admin token is configured::

    Router(routes, mounts={"/admin": admin, "/console": create_console(...)})

Logging in takes the admin token; pages are plain HTML from Jinja2 templates with one
stylesheet, all shipped in this package (no script, nothing from the network). Sessions
are kept in the state database ``data`` reads, so replicas sharing it share logins. See
docs/CONSOLE.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette

from modelfence.config import ConsoleConfig
from modelfence.console.accounts import AccountData, AccountSource
from modelfence.console.data import ConsoleData
from modelfence.console.guard import ConsoleGuard
from modelfence.console.pages import Console
from modelfence.console.sessions import SessionStore
from modelfence.detect.overrides import OperatorActions
from modelfence.errors import StoreError
from modelfence.forensics.allowlist import SuspectAllowList
from modelfence.forensics.service import Forensics
from modelfence.identity.failures import AuthFailures
from modelfence.types import ASGIApp


def create_console(
    *,
    data: ConsoleData,
    actions: OperatorActions,
    forensics: Forensics,
    admin_token: str,
    failures: AuthFailures,
    settings: ConsoleConfig,
    suspect_urls: Sequence[str] = (),
    accounts: AccountSource | None = None,
) -> ASGIApp:
    """The console as one ASGI app; ``failures`` is the admin API's guard against guessing,
    ``suspect_urls`` the admin API's ``forensics.allowed_suspect_urls`` (empty: none),
    ``accounts`` the identity layer's account record and trust (None: no account page)."""
    sessions = SessionStore(
        data.engine,  # the state database: every replica on it sees the same logins ...
        secret=admin_token,  # ... that has the same admin token (a new token ends them all)
        idle=settings.idle_minutes * 60,
        lifetime=settings.session_hours * 3600,
        max_sessions=settings.max_sessions,
    )
    pages = Console(
        data=data, actions=actions, forensics=forensics,
        suspects=SuspectAllowList(suspect_urls), sessions=sessions, token=admin_token,
        failures=failures, always_secure=settings.secure_cookie == "always",
        accounts=None if accounts is None else AccountData(data.engine, accounts),
    )
    app = Starlette(routes=pages.routes(), exception_handlers={StoreError: pages.store_failed})
    return ConsoleGuard(app, sessions=sessions)


__all__ = ["AccountSource", "ConsoleData", "create_console"]
