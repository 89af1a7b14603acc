"""The composition root: the only module that knows every layer and wires them together.

``create_app(config)`` returns an ASGI app whose lifespan opens the store, the limit
backend and the one aiohttp session, and closes them again. The request path is a fixed
list of stages, stacked in one place (``ModelFenceApp._build``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from modelfence import __version__
from modelfence.admin.accounts import accounts_router, signups_router
from modelfence.admin.api import create_admin_app
from modelfence.admin.capabilities import capabilities_router
from modelfence.admin.confidential import confidential_audit_router, create_broker_app
from modelfence.admin.detection import detection_router
from modelfence.admin.forensics import forensics_router
from modelfence.admin.policy import policy_router
from modelfence.confidential.broker import AuditLog, KeyBroker, ReleasePolicy
from modelfence.confidential.config import ConfidentialConfig
from modelfence.confidential.keyfile import read_key_file
from modelfence.confidential.platforms import verifiers
from modelfence.config import Config, TierConfig
from modelfence.console import AccountSource, ConsoleData, create_console
from modelfence.detect.actions import Policy
from modelfence.detect.cache import ActionCache
from modelfence.detect.feeds import RedisStreamSink
from modelfence.detect.overrides import OperatorActions
from modelfence.detect.process import DetectorProcess, redis_client
from modelfence.detect.state import PinnedState, RedisState, SqlState, StateReader
from modelfence.forensics.service import Forensics
from modelfence.gateway.admission import Admission
from modelfence.gateway.apis import Api, OIPApi, OpenAIApi
from modelfence.gateway.auth import Authenticate, Fingerprinting
from modelfence.gateway.boundary import ErrorBoundary
from modelfence.gateway.detection import Enforce
from modelfence.gateway.endpoints import (
    CatalogSource,
    Dependency,
    MetricsEndpoint,
    ModelCatalog,
    OIPModelMetadata,
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
from modelfence.gateway.telemetry import EmitEvents
from modelfence.gateway.upstream import AiohttpTransport, Transport, upstream_session
from modelfence.gateway.watermark import OutputWatermark, RegionMarks
from modelfence.identity import (
    ApiKeyRecord,
    AuthFailures,
    FailureLimiter,
    Fingerprinter,
    KeyRegistry,
    SqlKeyStore,
    load_server_secret,
)
from modelfence.identity.signups import SignupWatch
from modelfence.identity.trust import TrustPolicy
from modelfence.limits import LimitBackend, Quota, build_backend, quota_for
from modelfence.operations import Operation
from modelfence.periodic import Periodic
from modelfence.policy import BudgetAccountant, NormalRisk, RiskOverrides, build_accountant
from modelfence.policy.risk import RiskLevel
from modelfence.store import create_tables, open_engine, transaction
from modelfence.telemetry.metrics import Metrics
from modelfence.telemetry.pipeline import EventPipeline, PipelineSettings, Sink
from modelfence.telemetry.sinks import OtelSink, SqlSink
from modelfence.types import ASGIApp, Receive, Scope, Send
from modelfence.watermark.channel import MarkIssuer
from modelfence.watermark.keys import WatermarkKeyring
from modelfence.watermark.ledger import MarkLedger
from modelfence.watermark.regions import load_profiles

log = logging.getLogger("modelfence")

DETECTOR_START_SECONDS = 30.0


@dataclass(slots=True)
class Services:
    """What the lifespan opens and must close again."""

    engine: AsyncEngine
    store: SqlKeyStore
    registry: KeyRegistry
    signups: SignupWatch
    backend: LimitBackend
    session: aiohttp.ClientSession
    transports: dict[str, Transport]
    accountant: BudgetAccountant
    detection: Detection
    keyring: WatermarkKeyring
    ledger: MarkLedger
    broker: KeyBroker | None  # confidential.enabled


@dataclass(slots=True)
class Detection:
    """Telemetry out, verdicts in: what ``detection`` and ``telemetry`` open."""

    state: SqlState
    hash_key: bytes
    pipeline: EventPipeline | None = None
    redis: Redis | RedisCluster | None = None  # detection.feed: redis (streams, shared actions)
    detector: DetectorProcess | None = None  # detection.feed: process
    supervisor: Periodic | None = None
    actions: ActionCache | None = None  # None when detection is off

    async def close(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.actions is not None:
            await self.actions.stop()
        if self.pipeline is not None:
            await self.pipeline.stop()
        if self.detector is not None:
            await asyncio.to_thread(self.detector.stop)
        if self.redis is not None:
            await self.redis.aclose()


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
        # Models configured by exact name are metric labels from the start.
        self.metrics = Metrics(
            models=PatternTable((m, True) for u in config.upstreams for m in u.models).exact_names
        )
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
        broker = _open_broker(config.confidential)  # a bad key file stops start-up first
        engine = open_engine(config.store)
        await create_tables(engine)
        secret = load_server_secret(config.secret, config.secret_file)
        store = SqlKeyStore(
            engine,
            secret,
            ipv4_prefix=config.fingerprint.ipv4_prefix,
            ipv6_prefix=config.fingerprint.ipv6_prefix,
        )
        signups = SignupWatch(config.accounts.surge, on_surge=self.metrics.signup_surge)
        registry = KeyRegistry(
            store,
            secret,
            on_refresh_error=lambda _exc: self.metrics.key_refresh_errors.inc(),
            on_lookup_refused=self.metrics.key_lookups_refused.inc,
            signups=signups,
        )
        await registry.start()
        backend = build_backend(
            config.limits,
            on_fallback=self.metrics.backend_failure,
            on_release=self.metrics.limit_release,
        )
        session = upstream_session()
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
        detection = await self._open_detection(
            engine, secret.derive("telemetry-prompt-hash", 32)
        )
        if detection.actions is not None:
            self.risk.inner = detection.actions
        ledger = MarkLedger(
            engine,
            per_client=config.watermark.labels.ledger_per_client,
            on_error=self.metrics.task_error,
            on_drop=self.metrics.ledger_drop,
        )
        await ledger.start()
        self.services = Services(
            engine=engine,
            store=store,
            registry=registry,
            signups=signups,
            backend=backend,
            session=session,
            transports=transports,
            accountant=build_accountant(
                config.limits.backend,
                engine,
                config.policy.dp,
                redis_timeout_seconds=config.limits.redis_timeout_seconds,
            ),
            detection=detection,
            keyring=WatermarkKeyring(secret, version=config.watermark.key_version),
            ledger=ledger,
            broker=broker,
        )
        self._app = self._build(self.services)

    async def shutdown(self) -> None:
        services, self.services = self.services, None
        if services is None:
            return
        await services.detection.close()
        await services.registry.stop()
        await services.backend.close()
        await services.accountant.close()
        await services.session.close()
        await services.ledger.stop()
        await services.engine.dispose()

    async def _open_detection(self, engine: AsyncEngine, hash_key: bytes) -> Detection:
        """The telemetry pipeline and its sinks, the detector feed, and the action cache."""
        config, metrics = self.config, self.metrics
        telemetry, settings = config.telemetry, config.detection
        out = Detection(state=SqlState(engine), hash_key=hash_key)
        if settings.enabled and settings.feed == "redis":
            out.redis = redis_client(config)
        if telemetry.enabled:
            await self._open_telemetry(out, engine)
        if settings.enabled:
            reader: StateReader
            if settings.shadow:
                # Not even actions the detector stored before shadow mode: operator pins only.
                log.warning("detection.shadow is on: only operator pins are enforced")
                reader = PinnedState(out.state)
            else:
                reader = RedisState(out.redis) if out.redis is not None else out.state
            out.actions = ActionCache(
                reader, poll_seconds=settings.state_poll_seconds, on_error=metrics.task_error
            )
            await out.actions.start()
        return out

    async def _open_telemetry(self, out: Detection, engine: AsyncEngine) -> None:
        """The event pipeline: OTel spans, and the detector feed or the state database.

        With detection on, events leave the gateway through the feed alone and the detector
        writes them to ``request_events``: no database writes compete with the proxy.
        """
        config, metrics = self.config, self.metrics
        telemetry, settings = config.telemetry, config.detection
        sinks: list[Sink] = []
        if not settings.enabled:
            sinks.append(
                SqlSink(
                    engine,
                    store_prompt_text=telemetry.store_prompt_text,
                    retention_days=telemetry.retention_days,
                )
            )
        if telemetry.otel_spans:
            sinks.append(OtelSink())
        if out.redis is not None:
            sinks.append(RedisStreamSink(out.redis, settings.partitions))
        elif settings.enabled:
            out.detector = DetectorProcess(config, on_restart=metrics.detector_restarts.inc)
            metrics.registry.register(out.detector.metrics)  # the child's, on our /metrics
            sinks.append(out.detector.sink())
        out.pipeline = EventPipeline(
            sinks,
            settings=PipelineSettings.of(telemetry),
            count=_EventCounts(metrics),
        )
        if out.detector is not None:
            out.detector.start()
            # Serve once the detector runs (numpy and the embedder take a moment to load).
            if not await asyncio.to_thread(out.detector.wait_ready, DETECTOR_START_SECONDS):
                log.warning("the detector child is not running yet; serving without it")
            out.supervisor = Periodic(
                "detector-supervisor",
                out.detector.supervise,
                interval=1.0,
                on_error=metrics.task_error,
            )
            out.supervisor.start()
        await out.pipeline.start()

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
        apis: dict[Operation, Api] = {op: openai for op in Operation}
        apis[Operation.OIP_INFER] = OIPApi()
        limits = config.limits

        def resolve_quota(tier: TierConfig, key: ApiKeyRecord) -> Quota:
            return quota_for(
                tier,
                key.overrides,
                per_ip_prefix=limits.per_ip_prefix,
                per_fingerprint=limits.per_fingerprint,
            )

        trust = TrustPolicy(config.accounts, registry, surges=services.signups)
        fingerprinter = Fingerprinter.from_config(config)
        api_failures, admin_failures, broker_failures = (
            AuthFailures(
                FailureLimiter(config.server.auth_failures_per_minute),
                surface=surface,
                source=fingerprinter.source,
                on_event=metrics.auth_failure,
            )
            for surface in ("api", "admin", "broker")
        )

        def authenticated(endpoint: ASGIApp) -> ASGIApp:
            return Authenticate(endpoint, keys=registry, failures=api_failures)

        lexical = config.watermark.lexical
        lexical_upstreams = marked_upstreams(lexical, [u.name for u in config.upstreams])
        text_marks = config.watermark.text
        marks = MarkIssuer(keyring, text_marks) if text_marks.enabled else None
        profiles = load_profiles(config.watermark.labels.regions)
        pipeline, actions = detection.pipeline, detection.actions
        inference = _stack(
            Proxy(transports=transports, metrics=metrics),
            [
                lambda app: app if pipeline is None else EmitEvents(
                    app, emit=pipeline.emit, hash_key=detection.hash_key
                ),
                authenticated,
                lambda app: Fingerprinting(app, fingerprinter=fingerprinter),
                lambda app: app if actions is None else Enforce(
                    app, actions=actions, metrics=metrics
                ),
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
                    trust=trust,
                ),
                lambda app: app if marks is None else SourceMarking(
                    app, issuer=marks, hosted=lexical_upstreams
                ),
                lambda app: OutputHardening(
                    app,
                    policy=config.policy,
                    risk=self.risk,
                    accountant=services.accountant,
                    trust_levels={"probation": RiskLevel(config.accounts.probation_answers)},
                    think_opened=frozenset(
                        u.name for u in config.upstreams if u.think_opened_in_prompt
                    ),
                    on_unread=partial(metrics.answer_unread, "hardening"),
                ),
                lambda app: OutputWatermark(
                    app, config=config.watermark, keyring=keyring, ledger=services.ledger,
                    metrics=metrics,
                    regions=RegionMarks(config.watermark, profiles) if profiles else None,
                    on_unread=partial(metrics.answer_unread, "watermark"),
                ),
                lambda app: LexicalWatermark(
                    app, config=lexical, keyring=keyring, upstreams=lexical_upstreams,
                    on_unread=partial(metrics.answer_unread, "lexical"),
                ) if lexical_upstreams else app,
            ],
        )
        # Readiness follows the fail mode: only "closed" needs the limit backend to serve.
        dependencies = [
            Dependency("store", self._store_probe),
            Dependency("limits", backend.ping, required=limits.on_backend_error == "closed"),
        ]
        for upstream in config.upstreams:
            path = "/v2/health/ready" if upstream.kind == "oip" else "/v1/models"
            probe = upstream_probe(transports[upstream.name], path)
            dependencies.append(Dependency(f"upstream:{upstream.name}", probe, pool="upstreams"))
        if services.detection.detector is not None:
            # The gateway serves without its detector (and restarts it): degraded, not down.
            detector = services.detection.detector
            dependencies.append(Dependency("detector", detector.probe, required=False))
        # Says what sealed model parts are worth here (``simulated`` without a TEE).
        confidential = config.confidential
        readiness = Readiness(
            dependencies,
            facts={"confidential": {"security_level": confidential.security_level}}
            if confidential.enabled else {},
        )
        catalog = ModelCatalog(
            [CatalogSource(transports[u.name], u.kind, u.models) for u in config.upstreams],
            access=access,
        )
        routes: dict[tuple[str, str], ASGIApp] = {
            ("POST", op.route): inference for op in Operation
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
        shared = RedisState(detection.redis) if detection.redis is not None else None
        forensics = Forensics(services.engine, keyring, config.watermark, profiles)
        # One set of operator actions for the admin API and the console alike.
        operator = OperatorActions(detection.state, Policy(config.detection), shared=shared)
        admin = create_admin_app(
            store=services.store,
            admin_token=config.admin_token,
            tiers=limits.tiers,
            failures=admin_failures,
            routers=[
                accounts_router(services.store, trust),
                signups_router(services.signups, enabled=config.accounts.surge.enabled),
                policy_router(config.policy, limits.tiers, self.risk),
                detection_router(detection.state, operator),
                forensics_router(forensics, config.forensics),
                capabilities_router(capabilities(config)),
                *(
                    [confidential_audit_router(services.broker, confidential.security_level)]
                    if services.broker is not None else []
                ),
            ],
        )
        mounts: dict[str, ASGIApp] = {"/admin": admin}
        if services.broker is not None:
            assert confidential.token is not None  # the config requires it when enabled
            mounts["/confidential"] = create_broker_app(
                services.broker, token=confidential.token, failures=broker_failures,
                security_level=confidential.security_level,
            )
        if config.admin_token is not None:
            # The operator console logs in with the admin token: without one it is not served.
            mounts["/console"] = create_console(
                data=ConsoleData(
                    detection.state,
                    telemetry_drops=None if pipeline is None else lambda: sum(
                        n for fate, n in pipeline.stats.items() if fate.startswith("dropped")
                    ),
                    detection=config.detection,  # the tiers' thresholds of the risk chart
                ),
                actions=operator,
                forensics=forensics,
                admin_token=config.admin_token,
                failures=admin_failures,
                settings=config.console,
                suspect_urls=config.forensics.allowed_suspect_urls,
                # The account page: the record and the trust GET /admin/v1/accounts/{account}
                # answers with (as of now, before risk detection adds).
                accounts=AccountSource(
                    read=services.store.get_account,
                    standing=lambda record: trust.assess(record, "normal", time.time()),
                ),
            )
        router = Router(routes, mounts=mounts)
        return ErrorBoundary(router, metrics=metrics, max_header_bytes=config.server.max_header_bytes)

    async def _store_probe(self) -> None:
        assert self.services is not None
        async with transaction(self.services.engine) as conn:
            await conn.execute(text("SELECT 1"))


class _EventCounts:
    """The pipeline's ``count``: called per event, so label children are cached."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._children: dict[str, Any] = {}

    def __call__(self, fate: str, n: int) -> None:
        child = self._children.get(fate)
        if child is None:
            kind, _, sink = fate.partition(":")
            if kind == "sink_error":
                child = self.metrics.sink_errors.labels(sink)
            else:
                child = self.metrics.events.labels(kind)
            self._children[fate] = child
        child.inc(n)


def _open_broker(settings: ConfidentialConfig) -> KeyBroker | None:
    """The key broker for sealed model parts, and its security level said at start-up."""
    if not settings.enabled:
        return None
    assert settings.kek_file is not None  # the config requires it when enabled
    sim_key = settings.sim_platform_public_key
    checks = verifiers(settings.tee_types, bytes.fromhex(sim_key) if sim_key else None)
    policy = ReleasePolicy(
        settings.profile,
        frozenset(settings.tee_types),
        frozenset(settings.measurements),
        min_security_version=settings.min_security_version,
        min_artifact_versions=dict(settings.min_artifact_versions),
    )
    audit = AuditLog(Path(settings.audit_log) if settings.audit_log else None)
    broker = KeyBroker(
        read_key_file(Path(settings.kek_file), "confidential.kek_file"),
        policy,
        checks,
        audit,
        nonce_ttl=settings.nonce_ttl_seconds,
    )
    if settings.security_level == "simulated":
        log.warning(
            "confidential: key broker on (%s profile; tee types %s); security level SIMULATED: "
            "the sim platform is software, nothing it attests is protected by hardware",
            settings.profile, ", ".join(settings.tee_types),
        )
    else:
        log.info("confidential: key broker on (%s profile; tee types %s); security level hardware",
                 settings.profile, ", ".join(settings.tee_types))
    return broker


def capabilities(config: Config) -> dict[str, Any]:
    """What ``GET /admin/v1/capabilities`` answers: the layers on, and how strong they are."""
    confidential, detection, marks = config.confidential, config.detection, config.watermark
    return {
        "version": __version__,
        "limits": {"backend": "redis" if config.limits.backend.startswith("redis") else "memory",
                   "on_backend_error": config.limits.on_backend_error},
        "detection": {"enabled": detection.enabled, "feed": detection.feed,
                      "shadow": detection.shadow},
        "watermark": {"labels": marks.labels.enabled, "embeddings": marks.embeddings.enabled,
                      "text": marks.text.enabled,
                      "lexical": marks.lexical.enabled and bool(marks.lexical.upstreams)},
        "confidential": {
            "enabled": confidential.enabled,
            "profile": confidential.profile,
            "tee_types": list(confidential.tee_types) if confidential.enabled else [],
            "security_level": confidential.security_level,
        },
    }


def create_app(config: Config) -> ModelFenceApp:
    return ModelFenceApp(config)
