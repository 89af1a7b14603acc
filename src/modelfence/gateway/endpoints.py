"""Endpoints the gateway answers itself: health, readiness, metrics and model listings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from modelfence.errors import ModelFenceError, UpstreamError
from modelfence.gateway.context import context_of
from modelfence.gateway.responses import send_bytes, send_json
from modelfence.gateway.routing import ModelAccess
from modelfence.gateway.upstream import Transport, UpstreamRequest
from modelfence.telemetry.metrics import Metrics
from modelfence.types import Receive, Scope, Send

Probe = Callable[[], Awaitable[None]]  # raises when the dependency is not usable


async def healthz(scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, 200, {"status": "ok"})


class MetricsEndpoint:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_bytes(
            send, 200, self.metrics.render(), [], content_type=b"text/plain; version=0.0.4"
        )


class Readiness:
    """Probes every dependency at most once a second; 200 only when all answer."""

    def __init__(self, probes: Mapping[str, Probe], *, timeout: float = 2.0) -> None:
        self.probes = dict(probes)
        self.timeout = timeout
        self._cached: tuple[float, int, dict[str, str]] | None = None
        self._lock = asyncio.Lock()

    async def _probe(self, probe: Probe) -> str:
        try:
            await asyncio.wait_for(probe(), self.timeout)
        except asyncio.TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except (ModelFenceError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return "ok"

    async def check(self) -> tuple[int, dict[str, str]]:
        async with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > 1.0:
                names = list(self.probes)
                results = await asyncio.gather(*(self._probe(self.probes[n]) for n in names))
                checks = dict(zip(names, results, strict=True))
                status = 200 if all(r == "ok" for r in results) else 503
                self._cached = (now, status, checks)
            return self._cached[1], self._cached[2]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status, checks = await self.check()
        await send_json(send, status, {"status": "ready" if status == 200 else "not ready",
                                       "checks": checks})


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
        name = ctx.path_model or ""
        upstream = self.access.upstream_for(name, ctx.tier)
        ctx.model = name
        response = await self.transports[upstream].send(UpstreamRequest("GET", scope["path"]))
        try:
            body = await response.read()
        finally:
            response.close()
        await send_bytes(send, response.status, body, [])
