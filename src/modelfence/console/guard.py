"""The console's front door: security headers, the session check and CSRF, before any page.

A pure ASGI middleware so that no page handler can forget a check: every response gets
the headers below and ``Server-Timing`` (what the benchmark reads); every path but the
login form and the stylesheet needs a live session (else a redirect to the login form);
every POST must come from this origin when the browser says where it comes from, and every
POST but the login must carry the session's CSRF token. The form is read here, bounded,
and handed to the page as ``scope["console.form"]``; the session as
``scope["console.session"]``. Sessions live in the state database: when it cannot be
read, every page but the public ones is a 503 page saying so (never a redirect to the
login form, which would loop).
"""

from __future__ import annotations

import hmac
import html
import logging
import time
from urllib.parse import parse_qsl, urlsplit

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from modelfence.console.sessions import Session, SessionStore
from modelfence.errors import StoreError
from modelfence.throttled_log import ThrottledLog
from modelfence.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
_store_failures = ThrottledLog(log, interval=10.0)

COOKIE = "mf_console"
# A pasted text of 60,000 characters, each up to 9 bytes once URL-encoded, fits.
MAX_FORM_BYTES = 640 * 1024
PUBLIC_PATHS = frozenset({"/login", "/static/console.css"})

SECURITY_HEADERS = [
    (b"content-security-policy",
     (b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
      b"base-uri 'none'")),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # "no-referrer" makes form posts say Origin: null
    (b"cache-control", b"no-store"),
]


# Static on purpose: nothing of the failure (hosts, driver messages) reaches a visitor who
# may not be logged in; the log has the details.
UNAVAILABLE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Error 503 · ModelFence console</title>
<link rel="stylesheet" href="{root}/static/console.css"></head>
<body><main id="main"><h1>Error 503</h1>
<p class="error" role="alert">The console cannot reach its state database, where logins are
kept, so it cannot tell whether you are logged in. Nothing was changed. Try again in a
moment; if this persists, check the database the gateway's <code>store</code> names.</p>
</main></body></html>
"""


def unavailable(root: str) -> HTMLResponse:
    """The 503 page when the sessions cannot be read: no layout, since nobody is known yet."""
    return HTMLResponse(
        UNAVAILABLE_PAGE.format(root=html.escape(root)), status_code=503, headers={"retry-after": "5"}
    )


class FormTooLarge(Exception):
    pass


async def read_form(receive: Receive) -> list[tuple[str, str]]:
    """The url-encoded body as pairs; past :data:`MAX_FORM_BYTES` it is refused."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > MAX_FORM_BYTES:
            raise FormTooLarge
        if not message.get("more_body", False):
            break
    return parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)


def _same_origin(headers: Headers) -> bool:
    """False only when the browser names another origin than the host it talks to."""
    origin = headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == headers.get("host", "")


class ConsoleGuard:
    def __init__(self, app: ASGIApp, *, sessions: SessionStore) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = (time.perf_counter() - started) * 1000
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        *SECURITY_HEADERS,
                        (b"server-timing", f"app;dur={elapsed:.1f}".encode()),
                    ],
                }
            await send(message)

        refusal = await self._check(scope, receive)
        if refusal is not None:
            await refusal(scope, receive, send_guarded)
            return
        await self.app(scope, receive, send_guarded)

    async def _check(self, scope: Scope, receive: Receive) -> Response | None:
        """None when the request may reach its page (the form and session put in scope)."""
        root = scope.get("root_path", "")  # where the console is mounted
        path = scope["path"].removeprefix(root)
        headers = Headers(scope=scope)
        post = scope["method"] == "POST"
        if post and not _same_origin(headers):
            return PlainTextResponse("Cross-origin form refused.", status_code=403)
        session: Session | None = None
        if path not in PUBLIC_PATHS:
            # Every value of the cookie is tried: one planted from a sibling domain must not
            # hide the real one (nor lock the operator out).
            try:
                found = await self.sessions.live(cookies(headers))
            except StoreError as exc:
                _store_failures.error("console: sessions unreadable, answering 503: %s", exc)
                return unavailable(root)
            if found is None:
                return RedirectResponse(root + "/login", status_code=303)
            session_id, session = found
            scope["console.session"] = session
            scope["console.session_id"] = session_id  # what logout ends: the one checked
        if post:
            try:
                form = await read_form(receive)
            except FormTooLarge:
                return PlainTextResponse("Form too large.", status_code=413)
            if session is not None:
                sent = [value for name, value in form if name == "csrf"]
                if len(sent) != 1 or not hmac.compare_digest(sent[0].encode(), session.csrf.encode()):
                    return PlainTextResponse(
                        "Missing or wrong CSRF token: reload the page and try again.",
                        status_code=403,
                    )
            scope["console.form"] = [(name, value) for name, value in form if name != "csrf"]
        return None


def cookies(headers: Headers) -> list[str]:
    """Every value the browser sent for the console's cookie (at most 16 looked at)."""
    found: list[str] = []
    for header in headers.getlist("cookie"):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                found.append(value)
    return found[:16]
