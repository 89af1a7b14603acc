"""The composition root: the only module that knows every layer and wires them together.

``create_app(config)`` returns an ASGI app whose lifespan opens the store, the limit
backend and the one aiohttp session, and closes them again. The request path is a fixed
list of stages, stacked in one place (``ModelFenceApp._build``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence.admin.api import create_admin_app
from modelfence.admin.forensics import forensics_router
from modelfence.admin.policy import policy_router
from modelfence.config import Config, TierConfig
from modelfence.detect.runtime import DetectionRuntime
from modelfence.forensics.service import Forensics
from modelfence.gateway.admission import Admission
from modelfence.gateway.apis import Api, OIPApi, OpenAIApi
from modelfence.gateway.auth import Authenticate, Fingerprinting
from modelfence.gateway.boundary import ErrorBoundary
from modelfence.gateway.endpoints import (
    CatalogSource,
    MetricsEndpoint,
    ModelCatalog,
    OIPModelMetadata,
    Probe,
    Readiness,
    healthz,
    upstream_probe,
)
from modelfence.gateway.hardening import OutputHardening
from modelfence.gateway.lexical import LexicalWatermark, marked_upstreams
from modelfence.gateway.proxy import Proxy
from modelfence.gateway.request import ReadRequest
from modelfence.gateway.request_policy import RequestPolicy
from modelfence.gateway.router import Router
from modelfence.gateway.routing import ModelAccess, PatternTable, allow_list
from modelfence.gateway.source_mark import SourceMarking
from modelfence.gateway.upstream import AiohttpTransport, Transport
from modelfence.gateway.watermark import OutputWatermark
from modelfence.identity import (
    ApiKeyRecord,
    Fingerprinter,
    KeyRegistry,
    SqlKeyStore,
    load_server_secret,
)
from modelfence.limits import LimitBackend, Quota, build_backend, quota_for
from modelfence.policy import BudgetAccountant, NormalRisk, RiskOverrides, build_accountant
from modelfence.store import create_tables, open_engine, transaction
from modelfence.telemetry.metrics import Metrics
from modelfence.types import ASGIApp, Receive, Scope, Send
from modelfence.watermark.channel import MarkIssuer
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.ledger import MarkLedger

log = logging.getLogger("modelfence")

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
OIP_INFER = "/v2/models/{name}/infer"


@dataclass(slots=True)
class Services:
    """What the lifespan opens and must close again."""

    engine: AsyncEngine
    store: SqlKeyStore
    registry: KeyRegistry
    backend: LimitBackend
    session: aiohttp.ClientSession
    transports: dict[str, Transport]
    accountant: BudgetAccountant
    detection: DetectionRuntime
    keyring: WatermarkKeyring
    ledger: MarkLedger


def _stack(endpoint: ASGIApp, stages: list[Callable[[ASGIApp], ASGIApp]]) -> ASGIApp:
    """Wrap ``endpoint`` so that ``stages[0]`` runs first."""
    app = endpoint
    for stage in reversed(stages):
        app = stage(app)
    return app


class ModelFenceApp:
    """The gateway as one ASGI callable (lifespan included)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.services: Services | None = None
        # Detection replaces the inner source; operators pin levels through the admin API.
        self.risk = RiskOverrides(NormalRisk())
        self._app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if self._app is None:
            raise RuntimeError("ModelFenceApp.startup() has not run")
        await self._app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        config = self.config
        engine = open_engine(config.store)
        await create_tables(engine)
        secret = load_server_secret(config.secret, config.secret_file)
        store = SqlKeyStore(engine, secret)
        registry = KeyRegistry(
            store, secret, on_refresh_error=lambda _exc: self.metrics.key_refresh_errors.inc()
        )
        await registry.start()
        backend = build_backend(config.limits, on_fallback=self.metrics.backend_failure)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), auto_decompress=False
        )
        transports: dict[str, Transport] = {
            u.name: AiohttpTransport(
                u.name,
                u.url,
                session,
                api_key=u.api_key,
                timeout_seconds=u.timeout_seconds,
                connect_timeout_seconds=u.connect_timeout_seconds,
            )
            for u in config.upstreams
        }
        detection = DetectionRuntime(config, engine, self.metrics, secret)
        await detection.start()
        if detection.actions is not None:
            self.risk.inner = detection.actions
        ledger = MarkLedger(engine, per_client=config.watermark.labels.ledger_per_client)
        await ledger.start()
        self.services = Services(
            engine=engine,
            store=store,
            registry=registry,
            backend=backend,
            session=session,
            transports=transports,
            accountant=build_accountant(config.limits.backend, engine, config.policy.dp),
            detection=detection,
            keyring=WatermarkKeyring(secret, version=config.watermark.key_version),
            ledger=ledger,
        )
        self._app = self._build(self.services)

    async def shutdown(self) -> None:
        services, self.services = self.services, None
        if services is None:
            return
        await services.detection.stop()
        await services.registry.stop()
        await services.backend.close()
        await services.accountant.close()
        await services.session.close()
        await services.ledger.stop()
        await services.engine.dispose()

    def _build(self, services: Services) -> ASGIApp:
        config = self.config
        registry, backend, transports = services.registry, services.backend, services.transports
        detection, keyring = services.detection, services.keyring
        metrics = self.metrics
        access = ModelAccess(
            PatternTable((m, u.name) for u in config.upstreams for m in u.models),
            {name: allow_list(tier.models) for name, tier in config.limits.tiers.items()},
        )
        prices = PatternTable(config.prices.items())
        openai = OpenAIApi(config.limits.default_max_tokens)
        apis: dict[str, Api] = {route: openai for route in OPENAI_ROUTES}
        apis[OIP_INFER] = OIPApi()
        limits = config.limits

        def resolve_quota(tier: TierConfig, key: ApiKeyRecord) -> Quota:
            return quota_for(
                tier,
                key.overrides,
                per_ip_prefix=limits.per_ip_prefix,
                per_fingerprint=limits.per_fingerprint,
            )

        def authenticated(endpoint: ASGIApp) -> ASGIApp:
            return Authenticate(endpoint, keys=registry)

        fingerprinter = Fingerprinter.from_config(config)
        lexical = config.watermark.lexical
        lexical_upstreams = marked_upstreams(lexical, [u.name for u in config.upstreams])
        text_marks = config.watermark.text
        marks = MarkIssuer(keyring, text_marks) if text_marks.enabled else None
        inference = _stack(
            Proxy(transports=transports, metrics=metrics),
            [
                detection.emit_stage,
                authenticated,
                lambda app: Fingerprinting(app, fingerprinter=fingerprinter),
                detection.enforce_stage,
                lambda app: ReadRequest(
                    app, apis=apis, access=access, max_body_bytes=config.server.max_body_bytes
                ),
                lambda app: RequestPolicy(app, policy=config.policy),
                lambda app: Admission(
                    app,
                    backend=backend,
                    tiers=limits.tiers,
                    resolve_quota=resolve_quota,
                    prices=prices,
                    metrics=metrics,
                ),
                lambda app: app if marks is None else SourceMarking(
                    app, issuer=marks, hosted=lexical_upstreams
                ),
                lambda app: OutputHardening(
                    app, policy=config.policy, risk=self.risk, accountant=services.accountant
                ),
                lambda app: OutputWatermark(
                    app, config=config.watermark, keyring=keyring, ledger=services.ledger,
                    metrics=metrics,
                ),
                lambda app: LexicalWatermark(
                    app, config=lexical, keyring=keyring, upstreams=lexical_upstreams
                ) if lexical_upstreams else app,
            ],
        )
        probes: dict[str, Probe] = {"store": self._store_probe, "limits": backend.ping}
        for upstream in config.upstreams:
            path = "/v2/health/ready" if upstream.kind == "oip" else "/v1/models"
            probes[f"upstream:{upstream.name}"] = upstream_probe(transports[upstream.name], path)
        readiness = Readiness(probes)
        catalog = ModelCatalog(
            [CatalogSource(transports[u.name], u.kind, u.models) for u in config.upstreams],
            access=access,
        )
        routes: dict[tuple[str, str], ASGIApp] = {
            ("POST", route): inference for route in (*OPENAI_ROUTES, OIP_INFER)
        }
        routes.update(
            {
                ("GET", "/healthz"): healthz,
                ("GET", "/readyz"): readiness,
                ("GET", "/v2/health/ready"): readiness,
                ("GET", "/v2/health/live"): healthz,
                ("GET", "/metrics"): MetricsEndpoint(metrics),
                ("GET", "/v1/models"): authenticated(catalog),
                ("GET", "/v2/models/{name}"): authenticated(
                    OIPModelMetadata(transports, access=access)
                ),
            }
        )
        admin = create_admin_app(
            store=services.store,
            admin_token=config.admin_token,
            tiers=limits.tiers,
            routers=[
                policy_router(config.policy, limits.tiers, self.risk),
                detection.admin_router(),
                forensics_router(Forensics(services.engine, keyring, config.watermark)),
            ],
        )
        router = Router(routes, mounts={"/admin": admin})
        return ErrorBoundary(router, metrics=metrics, max_header_bytes=config.server.max_header_bytes)

    async def _store_probe(self) -> None:
        assert self.services is not None
        async with transaction(self.services.engine) as conn:
            await conn.execute(text("SELECT 1"))


def create_app(config: Config) -> ModelFenceApp:
    return ModelFenceApp(config)
