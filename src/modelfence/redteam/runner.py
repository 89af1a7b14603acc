"""Send planned traffic through a real gateway, many clients at once, on a virtual clock.

One ``LiveGateway`` owns one aiohttp session, the API keys it created through the admin
API and the log of every exchange; scenarios either hand it a whole plan (``run_plan``)
or call ``send`` themselves when their next query depends on the last answer (ART's
adaptive attacks run in a worker thread and reach it through ``blocking_send``).

    async with LiveGateway(url, admin_token) as gateway:
        await gateway.register(profiles)
        await run_plan(gateway, plans, VirtualClock(compression=600))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
import orjson

from modelfence.redteam.timing import VirtualClock
from modelfence.redteam.traffic import ClientProfile, Exchange, PlannedRequest

BLOCKED = frozenset({401, 403})


class LiveGateway:
    """A gateway under test: keys per client, one connection pool, every exchange logged."""

    def __init__(
        self, url: str, admin_token: str, *, concurrency: int = 16, timeout: float = 300.0
    ) -> None:
        self.url = url.rstrip("/")
        self.host = urlsplit(self.url).netloc
        self.admin_token = admin_token
        self.profiles: dict[str, ClientProfile] = {}
        self.keys: dict[str, str] = {}
        self.exchanges: list[Exchange] = []
        self.rotations: dict[str, int] = {}  # original client -> identities burnt
        self.clock: VirtualClock | None = None
        self._limit = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._current: dict[str, str] = {}  # planned client -> identity now in use
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Self:
        # No library defaults: every header comes from ``ClientProfile.wire_headers``.
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, skip_auto_headers=("user-agent", "accept", "accept-encoding", "content-type"),
        )
        self.loop = asyncio.get_running_loop()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use LiveGateway as an async context manager")
        return self._session

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Call the admin API; returns (status, parsed JSON or None)."""
        async with self.session.request(
            method, self.url + path, data=None if body is None else orjson.dumps(body),
            headers={"authorization": f"Bearer {self.admin_token}", "content-type": "application/json"},
        ) as response:
            raw = await response.read()
            try:
                return response.status, orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                return response.status, None

    async def register(self, profiles: Iterable[ClientProfile]) -> None:
        """Create one key per profile through ``POST /admin/v1/keys``."""
        for profile in profiles:
            status, body = await self.admin(
                "POST", "/admin/v1/keys", {"client": profile.name, "tier": profile.tier}
            )
            if status != 201:
                raise RuntimeError(f"creating a key for {profile.name!r} failed: {status} {body}")
            self.profiles[profile.name] = profile
            self.keys[profile.name] = str(body["api_key"])

    async def rotate(self, client: str) -> None:
        """Give ``client`` a fresh account: new name, key and address (a burnt key's owner
        signing up again)."""
        count = self.rotations.get(client, 0) + 1
        self.rotations[client] = count
        old = self.profiles[client]
        third = int(old.ip.split(".")[2])
        fresh = replace(
            old, name=f"{client}~{count}", campaign=old.actor,
            ip=f"10.250.{(third + count) % 256}.{count % 250 + 1}",
        )
        await self.register([fresh])
        self._current[client] = fresh.name

    async def send(self, plan: PlannedRequest) -> Exchange:
        identity = self._current.get(plan.client, plan.client)
        profile = self.profiles[identity]
        data = orjson.dumps(plan.body)
        headers = profile.wire_headers(self.keys[identity], data, self.host)
        sent_at = self.clock.virtual_now() if self.clock else plan.at
        async with self._limit:
            wall_at, started = time.time(), time.perf_counter()
            async with self.session.post(self.url + plan.route, data=data, headers=headers) as response:
                raw = await response.read()
                latency = (time.perf_counter() - started) * 1000
                try:
                    body = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    body = None
                kept = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith(("x-ratelimit", "retry-after"))}
                exchange = Exchange(plan, identity, response.status, latency, body, sent_at, kept, wall_at)
        self.exchanges.append(exchange)
        return exchange

    def blocking_send(self, plan: PlannedRequest) -> Exchange:
        """``send`` from a worker thread (ART calls its classifier synchronously)."""
        if self.loop is None:
            raise RuntimeError("the gateway is not open")
        return asyncio.run_coroutine_threadsafe(self.send(plan), self.loop).result()


async def run_plan(
    gateway: LiveGateway,
    plans: Sequence[PlannedRequest],
    clock: VirtualClock,
    *,
    rotate_on_block: frozenset[str] = frozenset(),
) -> list[Exchange]:
    """Send every plan at its virtual time (compressed by ``clock``); clients run at once.

    Each client's requests go in order; a client in ``rotate_on_block`` switches to a fresh
    account after a 401/403 or 429, as a thief with a stack of stolen cards would.
    """
    gateway.clock = clock
    by_client: dict[str, list[PlannedRequest]] = {}
    for plan in sorted(plans, key=lambda p: p.at):
        by_client.setdefault(plan.client, []).append(plan)

    async def client_loop(queue: list[PlannedRequest]) -> list[Exchange]:
        out = []
        for plan in queue:
            await asyncio.sleep(clock.delay_until(plan.at))
            exchange = await gateway.send(plan)
            out.append(exchange)
            if plan.client in rotate_on_block and (exchange.status in BLOCKED or exchange.status == 429):
                await gateway.rotate(plan.client)
        return out

    results = await asyncio.gather(*(client_loop(q) for q in by_client.values()))
    return [exchange for chunk in results for exchange in chunk]
