"""Endpoints the gateway answers itself: health, readiness, metrics and model listings."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from modelfence.errors import ModelFenceError, UpstreamError
from modelfence.gateway.apis import check_model_name
from modelfence.gateway.context import context_of
from modelfence.gateway.responses import send_bytes, send_json
from modelfence.gateway.routing import ModelAccess
from modelfence.gateway.upstream import Transport, UpstreamRequest
from modelfence.telemetry.metrics import Metrics
from modelfence.types import Receive, Scope, Send

Probe = Callable[[], Awaitable[None]]  # raises when the dependency is not usable

log = logging.getLogger("modelfence.gateway")


async def healthz(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, 200, {"status": "ok"})


class MetricsEndpoint:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(
            send, 200, self.metrics.render(), [], content_type=b"text/plain; version=0.0.4"
        )


@dataclass(frozen=True, slots=True)
class Dependency:
    """One thing readiness probes.

    ``required``: when it is down the replica is not ready; otherwise only degraded (a
    limit backend whose outage the configured fail mode rides out). Dependencies sharing a
    ``pool`` (the upstreams) count as down only when every one of them is: a replica that
    can still serve some models stays in the load balancer.
    """

    name: str  # shown unauthenticated: a component name, never a host or port
    probe: Probe
    required: bool = True
    pool: str | None = None


class Readiness:
    """Probes every dependency at most once a second.

    200 ``ready`` when all answer, 200 ``degraded`` when only what the replica can do
    without is down, 503 ``not ready`` otherwise. The body names components and their
    states (``ok``, ``down``); why one is down goes to the log, once per change, since
    this endpoint is unauthenticated. ``facts`` are added as they are: deliberately public
    ones only (whether sealed model parts here are protected by hardware or simulated, so
    that no one mistakes one for the other).
    """

    def __init__(self, dependencies: Sequence[Dependency], *, timeout: float = 2.0,
                 facts: Mapping[str, Any] | None = None) -> None:
        self.dependencies = list(dependencies)
        self.facts = dict(facts or {})  # fixed for the process: e.g. the confidential security level
        self.timeout = timeout
        self._cached: tuple[float, int, dict[str, Any]] | None = None
        self._failing: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def _probe(self, dependency: Dependency) -> bool:
        try:
            await asyncio.wait_for(dependency.probe(), self.timeout)
        except TimeoutError:
            self._note(dependency.name, f"no answer within {self.timeout:g}s")
            return False
        except (ModelFenceError, OSError) as exc:
            self._note(dependency.name, str(exc) or type(exc).__name__)
            return False
        if self._failing.pop(dependency.name, None) is not None:
            log.info("readiness: %s is back", dependency.name)
        return True

    def _note(self, name: str, reason: str) -> None:
        if self._failing.get(name) != reason:
            log.warning("readiness: %s is down: %s", name, reason)
        self._failing[name] = reason

    def _verdict(self, up: dict[str, bool]) -> tuple[int, str]:
        pools: dict[str, bool] = {}
        unready = False
        for dep in self.dependencies:
            if dep.pool is not None:
                pools[dep.pool] = pools.get(dep.pool, False) or up[dep.name]
            elif dep.required and not up[dep.name]:
                unready = True
        if unready or not all(pools.values()):
            return 503, "not ready"
        return 200, "ready" if all(up.values()) else "degraded"

    async def check(self) -> tuple[int, dict[str, Any]]:
        async with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > 1.0:
                results = await asyncio.gather(*(self._probe(d) for d in self.dependencies))
                up = {d.name: ok for d, ok in zip(self.dependencies, results, strict=True)}
                status, state = self._verdict(up)
                checks = {name: "ok" if ok else "down" for name, ok in up.items()}
                self._cached = (now, status, {"status": state, "checks": checks, **self.facts})
            return self._cached[1], self._cached[2]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, body = await self.check()
        await send_json(send, status, body)


def upstream_probe(transport: Transport, path: str) -> Probe:
    async def probe() -> None:
        response = await transport.send(UpstreamRequest("GET", path))
        try:
            if response.status >= 400:
                raise UpstreamError(f"{path} answered {response.status}")
        finally:
            response.close()

    return probe


@dataclass(frozen=True, slots=True)
class CatalogSource:
    transport: Transport
    kind: str  # "openai" lists upstream /v1/models; "oip" only its configured names
    configured: Sequence[str]


class ModelCatalog:
    """GET /v1/models: what the upstreams serve, filtered to what this key's tier may use."""

    def __init__(
        self, sources: Sequence[CatalogSource], *, access: ModelAccess, ttl: float = 30.0
    ) -> None:
        self.sources = sources
        self.access = access
        self.ttl = ttl
        self._cached: tuple[float, list[tuple[str, str]]] | None = None

    async def _names(self, source: CatalogSource) -> list[str]:
        names = [n for n in source.configured if not any(ch in n for ch in "*?[")]
        if source.kind != "openai":
            return names
        try:
            response = await source.transport.send(UpstreamRequest("GET", "/v1/models"))
            try:
                payload = orjson.loads(await response.read()) if response.status == 200 else {}
            finally:
                response.close()
        except (ModelFenceError, orjson.JSONDecodeError):
            return names
        listed = payload.get("data", []) if isinstance(payload, dict) else []
        return names + [m["id"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def models(self) -> list[tuple[str, str]]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self.ttl:
            found: dict[str, str] = {}
            for source in self.sources:
                for name in await self._names(source):
                    if self.access.upstreams.get(name) == source.transport.name:
                        found.setdefault(name, source.transport.name)
            self._cached = (now, sorted(found.items()))
        return self._cached[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tier = context_of(scope).tier
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": upstream}
            for name, upstream in await self.models()
            if self.access.allowed(name, tier)
        ]
        await send_json(send, 200, {"object": "list", "data": data})


class OIPModelMetadata:
    """GET /v2/models/{name}: relayed from the upstream that serves the model."""

    def __init__(self, transports: Mapping[str, Transport], *, access: ModelAccess) -> None:
        self.transports = transports
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_of(scope)
        name = check_model_name(ctx.path_model or None)
        upstream = self.access.upstream_for(name, ctx.tier)
        ctx.model = name
        path = "/v2/models/" + quote(name, safe="")  # never the client's path or query
        response = await self.transports[upstream].send(UpstreamRequest("GET", path))
        try:
            body = await response.read()
        finally:
            response.close()
        await send_bytes(send, response.status, body, [])
