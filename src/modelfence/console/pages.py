"""The console's pages and forms, rendered on the server from Jinja2 templates.

Reads go through :class:`~modelfence.console.data.ConsoleData`; acting on a client goes
through :class:`~modelfence.detect.overrides.OperatorActions`, the code path of
``POST /admin/v1/clients/{client}/action``, so a console block is audited and enforced
exactly like an API one. ``ConsoleGuard`` has checked the session and the CSRF token
before any handler here runs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from modelfence.console import charts, graph, words
from modelfence.console.accounts import AccountData
from modelfence.console.data import ClientFilter, ClientView, ConsoleData, Page
from modelfence.console.guard import COOKIE, cookies
from modelfence.console.params import (
    AccountQuery,
    AckForm,
    ActForm,
    AuditQuery,
    BadParameter,
    CampaignQuery,
    ClientPageQuery,
    ClientQuery,
    ClientsQuery,
    CutForm,
    LoginForm,
    ModelForm,
    Paging,
    TextForm,
    parse,
)
from modelfence.console.pictures import SPANS, Span
from modelfence.console.sessions import Session, SessionStore
from modelfence.detect.actions import LEVELS
from modelfence.detect.overrides import OperatorActions
from modelfence.errors import GatewayError, StoreError
from modelfence.forensics.allowlist import SuspectAllowList
from modelfence.forensics.errors import VerifyError, translated
from modelfence.forensics.service import ChatProbe, Forensics
from modelfence.forensics.text import DEFAULT_ALPHA
from modelfence.identity.failures import AuthFailures
from modelfence.throttled_log import ThrottledLog

log = logging.getLogger(__name__)
_store_failures = ThrottledLog(log, interval=10.0)
_STYLESHEET = resources.files("modelfence.console").joinpath("static/console.css")


def _when(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float) -> str:
    """A measured statistic or threshold: three significant digits, whole numbers past 1,000."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _epoch(value: float) -> str:
    """Event time (seconds since 1970, as the detector keeps it) as :func:`_when` shows it."""
    try:
        return _when(datetime.fromtimestamp(value, UTC))
    except (OverflowError, OSError, ValueError):
        return "—"


def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("modelfence.console", "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters.update(number=_number, epoch=_epoch)
    env.globals.update(words=words, levels=LEVELS)
    return env


class Console:
    """The handlers; ``token`` is the admin token, ``failures`` the admin surface's guard."""

    def __init__(
        self,
        *,
        data: ConsoleData,
        actions: OperatorActions,
        forensics: Forensics,
        suspects: SuspectAllowList,
        sessions: SessionStore,
        token: str,
        failures: AuthFailures,
        always_secure: bool = False,
        accounts: AccountData | None = None,
    ) -> None:
        self.data = data
        self.accounts = accounts  # None: no account registry wired (the page says so)
        self.always_secure = always_secure  # TLS ended by a proxy: the cookie is Secure anyway
        self.actions = actions
        self.forensics = forensics
        self.suspects = suspects  # ``forensics.allowed_suspect_urls``, as the admin API
        self.sessions = sessions
        self.token_digest = hashlib.sha256(token.encode()).digest()
        self.failures = failures
        self.templates = _templates()
        self.stylesheet = _STYLESHEET.read_bytes()

    def routes(self) -> list[Route]:
        return [
            Route("/", self.overview),
            Route("/login", self.login_form),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/clients", self.clients),
            Route("/client", self.client),
            Route("/campaigns", self.campaigns),
            Route("/campaign", self.campaign),
            Route("/account", self.account),
            Route("/act", self.act, methods=["POST"]),
            Route("/cut", self.cut, methods=["POST"]),
            Route("/audit", self.audit),
            Route("/alerts", self.alerts),
            Route("/alerts/ack", self.acknowledge, methods=["POST"]),
            Route("/evidence.json", self.evidence_json),
            Route("/report", self.report),
            Route("/forensics", self.forensics_form),
            Route("/forensics", self.verify_text, methods=["POST"]),
            Route("/forensics/model", self.verify_model, methods=["POST"]),
            Route("/static/console.css", self.stylesheet_file),
        ]

    # --- rendering -------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        session: Session | None = request.scope.get("console.session")
        html = self.templates.get_template(template).render(
            root=request.scope.get("root_path", ""),
            csrf=session.csrf if session else None,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def problem(self, request: Request, status: int, message: str) -> HTMLResponse:
        return self.render(request, "problem.html", status, status_code=status, message=message)

    def redirect(self, request: Request, path: str, **query: Any) -> RedirectResponse:
        root = request.scope.get("root_path", "")
        suffix = f"?{urlencode(query)}" if query else ""
        return RedirectResponse(f"{root}{path}{suffix}", status_code=303)

    @staticmethod
    def query(request: Request, model: type[Any]) -> Any:
        return parse(model, request.query_params.multi_items())

    @staticmethod
    def form(request: Request, model: type[Any]) -> Any:
        return parse(model, request.scope["console.form"])

    # --- login -----------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self.render(request, "login.html")

    async def login(self, request: Request) -> Response:
        try:
            token = self.form(request, LoginForm).token
        except BadParameter as exc:
            return self.render(request, "login.html", 400, error=str(exc))
        scope = request.scope
        if (refusal := self.failures.check(scope)) is not None:
            refused = self.render(request, "login.html", 429, error=refusal.message)
            refused.headers.update({k.decode(): v.decode() for k, v in refusal.headers})
            return refused
        source = self.failures.charge(scope)
        digest = hashlib.sha256(token.strip().encode()).digest()
        if not hmac.compare_digest(digest, self.token_digest):
            self.failures.failed(source, "incorrect admin token (console login)")
            return self.render(request, "login.html", 401, error="Incorrect admin token.")
        self.failures.forgive(source)
        # Never adopt a session id the browser brought: end each, and start a new one.
        try:
            session_id, _ = await self.sessions.create(replacing=cookies(request.headers))
        except StoreError:
            return self.render(request, "login.html", 503, error=(
                "The token is right, but no session could be stored: the state database is "
                "unreachable. Try again in a moment."))
        response = self.redirect(request, "/")
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=int(self.sessions.lifetime),
            path=request.scope.get("root_path", "") or "/",
            secure=self.always_secure or request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        # The session the guard checked ends here, and so on every replica.
        await self.sessions.end(request.scope["console.session_id"])
        response = self.redirect(request, "/login")
        response.delete_cookie(
            COOKIE, path=request.scope.get("root_path", "") or "/", httponly=True,
            samesite="strict",
        )
        return response

    # --- pages -----------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        return self.render(request, "overview.html", nav="overview",
                           overview=await self.data.overview())

    async def clients(self, request: Request) -> Response:
        try:
            query: ClientsQuery = self.query(request, ClientsQuery)
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        where = ClientFilter(
            tier=query.tier, level=query.level, account=query.account, entity=query.entity,
            reason=query.reason, search=query.q,
        )
        page = await self.data.clients(
            where, sort=query.sort, descending=query.order == "desc", page=query.page,
            per_page=query.per_page,
        )
        root = request.scope.get("root_path", "")
        current = query.model_dump(exclude_defaults=True)

        def link(**changes: Any) -> str:
            merged = {**current, **changes}
            return f"{root}/clients?" + urlencode({k: v for k, v in merged.items() if v})

        return self.render(
            request, "clients.html", nav="clients", query=query, page=page, link=link,
            tiers=await self.data.tiers(),
        )

    async def view(self, request: Request, model: type[ClientQuery]) -> ClientView | Response:
        """The client the query names, or the page that says why there is none."""
        try:
            name = self.query(request, model).name
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        view = await self.data.client(name)
        if view is None:
            return self.problem(request, 404, f"No client named {name!r} has been seen.")
        return view

    async def client(self, request: Request) -> Response:
        view = await self.view(request, ClientPageQuery)
        if isinstance(view, Response):
            return view
        span = self.query(request, ClientPageQuery).span  # checked by view()
        return self.render(request, "client.html", nav="clients", view=view,
                           done=request.query_params.get("done"),
                           **await self.pictures(view.client, span))

    async def pictures(self, client: str, span: Span) -> dict[str, Any]:
        """A client's risk chart over ``span`` and its query map (templates/charts.html)."""
        history = await self.data.risk_history(client, span=SPANS[span])
        queries = await self.data.query_map([client])
        return {
            "span": span,
            "history": history,
            "risk_chart": charts.risk_chart(history),
            "query_map": queries,
            "query_scatter": None if queries is None else charts.scatter(queries),
        }

    async def account(self, request: Request) -> Response:
        """An account as registered: trust, traits, keys, clients, related accounts, traffic."""
        try:
            account_id = self.query(request, AccountQuery).id
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        if self.accounts is None:
            return self.problem(request, 404, "Account pages need the gateway's key store, "
                                "which this console was not given.")
        view = await self.accounts.account(account_id)
        if view is None:
            return self.problem(request, 404, f"No account with id {account_id!r} is registered.")
        return self.render(request, "account.html", nav="clients", view=view)

    async def campaigns(self, request: Request) -> Response:
        """Entities (groups of linked clients) ranked by their riskiest member."""
        try:
            query: Paging = self.query(request, Paging)
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        page = await self.data.entities(page=query.page, per_page=query.per_page)
        return self.render(request, "campaigns.html", nav="campaigns", page=page,
                           pager=_pager(request, page))

    async def campaign(self, request: Request) -> Response:
        """Linked clients as a graph, with the evidence for each link and pooled numbers."""
        try:
            query: CampaignQuery = self.query(request, CampaignQuery)
            if (query.entity is None) == (query.client is None):
                raise BadParameter("entity", "give an entity, or a client (one of them)")
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        found = await self.data.campaign(entity=query.entity, client=query.client)
        if found is None:
            return self.problem(request, 404, (
                f"No entity named {query.entity!r}: no scored client belongs to it now "
                "(entities are rebuilt as links fade or are cut)." if query.entity is not None
                else f"No client named {query.client!r} has been scored."))
        queries = await self.data.query_map(found.mapped)  # pooled over the members
        drawing = await run_in_threadpool(graph.draw, found)  # tens of ms: off the event loop
        return self.render(request, "campaign.html", nav="campaigns", campaign=found,
                           drawing=drawing, done=query.done, queries=queries,
                           scatter=None if queries is None else charts.scatter(queries))

    async def audit(self, request: Request) -> Response:
        try:
            query: AuditQuery = self.query(request, AuditQuery)
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        page = await self.data.audit(page=query.page, per_page=query.per_page, client=query.client)
        return self.render(request, "audit.html", nav="audit", page=page, client=query.client,
                           pager=_pager(request, page, client=query.client))

    async def alerts(self, request: Request) -> Response:
        try:
            query: Paging = self.query(request, Paging)
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        page = await self.data.alerts(page=query.page, per_page=query.per_page)
        return self.render(request, "alerts.html", nav="alerts", page=page,
                           pager=_pager(request, page))

    # --- acting ----------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        try:
            form: ActForm = self.form(request, ActForm)
            await self.actions.pin(form.client, form.action, form.reason)
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        except GatewayError as exc:
            return self.problem(request, exc.status, exc.message)
        except StoreError as exc:  # nothing was applied: the transaction rolled back
            return self.problem(
                request, 503, f"The action was not applied ({exc}); try again in a moment."
            )
        return self.redirect(request, "/client", name=form.client, done=form.action)

    async def cut(self, request: Request) -> Response:
        try:
            form: CutForm = self.form(request, CutForm)
            if form.client == form.other:
                raise BadParameter("other", "a client cannot be cut from itself")
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        await self.actions.cut(form.client, form.other, cut=True, note=form.reason)
        if form.back_client is not None:
            return self.redirect(request, "/campaign", client=form.back_client, done="cut")
        if form.back_entity is not None:
            return self.redirect(request, "/campaign", entity=form.back_entity, done="cut")
        return self.redirect(request, "/client", name=form.client, done="cut")

    async def acknowledge(self, request: Request) -> Response:
        try:
            form: AckForm = self.form(request, AckForm)
        except BadParameter as exc:
            return self.problem(request, 400, str(exc))
        if await self.data.acknowledge(form.alert) is None:
            return self.problem(request, 404, f"No alert {form.alert}.")
        return self.redirect(request, "/alerts")

    # --- evidence --------------------------------------------------------------------

    async def evidence_json(self, request: Request) -> Response:
        view = await self.view(request, ClientQuery)
        if isinstance(view, Response):
            return view
        history = await self.data.risk_history(view.client, span=SPANS["7d"])
        queries = await self.data.query_map([view.client])
        body = orjson.dumps(
            {"exported_at": datetime.now(UTC), **asdict(view), "risk_history": asdict(history),
             "query_map": None if queries is None else queries.summary()},
            default=BaseModel.model_dump,
            option=orjson.OPT_INDENT_2,
        )
        # Headers are latin-1: an ASCII name, and the exact one as RFC 5987 UTF-8 beside it
        # (a client must not be able to stop its own export by its choice of name).
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in view.client)[:64]
        exact = quote(f"evidence-{view.client}.json", safe="")
        disposition = f"attachment; filename=\"evidence-{name}.json\"; filename*=UTF-8''{exact}"
        return Response(body, media_type="application/json",
                        headers={"content-disposition": disposition})

    async def report(self, request: Request) -> Response:
        view = await self.view(request, ClientQuery)
        if isinstance(view, Response):
            return view
        return self.render(request, "report.html", view=view, now=datetime.now(UTC),
                           **await self.pictures(view.client, "7d"))

    # --- forensics -------------------------------------------------------------------

    async def forensics_form(self, request: Request) -> Response:
        return self.render(request, "forensics.html", nav="forensics")

    async def verify_text(self, request: Request) -> Response:
        """Whose mark a leaked text carries: the admin API's ``POST /admin/v1/verify/text``."""
        try:
            text = self.form(request, TextForm).text
        except BadParameter as exc:
            return self.render(request, "forensics.html", 400, nav="forensics", error=str(exc))
        try:
            report = await self.forensics.text(text)
        except VerifyError as exc:
            return self.render(request, "forensics.html", translated(exc).status,
                               nav="forensics", error=str(exc), text=text)
        return self.render(request, "forensics.html", nav="forensics", report=report, text=text)

    async def verify_model(self, request: Request) -> Response:
        """Does a suspect model carry a client's marks: ``POST /admin/v1/verify/model``, with
        the same allow-list. The API key is used once and never put back in the page."""
        fields = request.scope["console.form"]
        # What the form shows again: never the key, and only what was typed in a field.
        typed = {k: v for k, v in fields if k in ("url", "kind", "model", "client")}
        try:
            form: ModelForm = self.form(request, ModelForm)
            self.suspects.check(form.url)
            verdict = await self.forensics.model(
                form.url, form.kind, form.model, form.api_key,
                chat=ChatProbe(client=form.client, max_tokens=form.max_tokens),
            )
        except BadParameter as exc:
            return self.render(request, "forensics.html", 400, nav="forensics",
                               model_error=str(exc), suspect=typed)
        except VerifyError as exc:
            answer = translated(exc)
            return self.render(request, "forensics.html", answer.status, nav="forensics",
                               model_error=answer.message, suspect=typed)
        return self.render(request, "forensics.html", nav="forensics",
                           suspect_verdict=verdict,
                           suspect=typed, alpha=DEFAULT_ALPHA)

    async def stylesheet_file(self, request: Request) -> Response:
        return Response(self.stylesheet, media_type="text/css")

    async def store_failed(self, request: Request, exc: Exception) -> Response:
        """A page whose reads or writes failed in the state database: a 503 page, not a 500.

        The failure may come after a write (a form's action, then its audit): the page
        cannot say whether anything changed, so it says so."""
        _store_failures.error("console: %s %s failed in the state database: %s",
                              request.method, request.url.path, exc)
        response = self.problem(request, 503, "The state database did not answer; what you "
                                "asked may not have been done. Reload in a moment to check.")
        response.headers["retry-after"] = "5"
        return response


def _pager(request: Request, page: Page[Any], **keep: Any) -> Mapping[str, str | None]:
    """Links to the previous and next page, keeping the other parameters."""
    base = request.url.path  # the mount point included

    def at(number: int) -> str:
        params = {k: v for k, v in {**keep, "page": number, "per_page": page.per_page}.items() if v}
        return f"{base}?{urlencode(params)}"

    return {
        "previous": at(page.page - 1) if page.page > 1 else None,
        "next": at(page.page + 1) if page.page < page.pages else None,
    }


