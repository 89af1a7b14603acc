"""The console's front door: security headers, the session check and CSRF, before any page.

A pure ASGI middleware so that no page handler can forget a check: every response gets
the headers below and ``Server-Timing`` (what the benchmark reads); every path but the
login form and the stylesheet needs a live session (else a redirect to the login form);
every POST must come from this origin when the browser says where it comes from, and every
POST but the login must carry the session's CSRF token. The form is read here, bounded,
and handed to the page as ``scope["console.form"]``; the session as
``scope["console.session"]``.
"""

from __future__ import annotations

import hmac
import time
from urllib.parse import parse_qsl, urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from modelfence.console.sessions import Session, SessionStore
from modelfence.types import ASGIApp, Message, Receive, Scope, Send

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
            live = ((value, self.sessions.get(value)) for value in cookies(headers))
            session_id, session = next(((v, s) for v, s in live if s is not None), ("", None))
            if session is None:
                return RedirectResponse(root + "/login", status_code=303)
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
