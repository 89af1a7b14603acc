"""Failed authentications per client address: random keys and token guesses get 429.

In-process, through the real registry on SQLite and the real admin application; the
client address is set per request through the ASGI scope, as uvicorn sets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from modelfence.admin import create_admin_app
from modelfence.errors import GatewayError
from modelfence.gateway.auth import Authenticate
from modelfence.gateway.context import SCOPE_KEY, RequestContext, context_of
from modelfence.identity import (
    AuthFailures,
    FailureLimiter,
    Fingerprinter,
    KeyRegistry,
    new_api_key,
)
from modelfence.store import create_tables
from modelfence.types import Receive, Scope, Send

from .test_identity_registry import SECRET, SpyStore
from .test_store_database import scratch_engine

TOKEN = "admin-token-0123456789abcdef"


def admin_failures(per_minute: int = 30, events: Counter[tuple[str, str]] | None = None) -> AuthFailures:
    """The admin surface's guard as app.py builds it, counting into ``events``."""
    counts = events if events is not None else Counter()
    return AuthFailures(
        FailureLimiter(per_minute),
        surface="admin",
        source=Fingerprinter().source,
        on_event=lambda surface, outcome: counts.update([(surface, outcome)]),
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_allows_a_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(6, clock=clock)  # one more every 10 s
    for _ in range(6):
        assert limiter.retry_after("a") is None
        limiter.record("a")
    assert limiter.retry_after("a") == pytest.approx(10)
    assert limiter.retry_after("b") is None
    clock.now += 10
    assert limiter.retry_after("a") is None
    limiter.record("a")
    assert limiter.retry_after("a") == pytest.approx(10)


def test_forgiving_takes_back_an_advance_charge() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(2, clock=clock)
    for _ in range(10):
        limiter.record("a")
        limiter.forgive("a")
    assert limiter.retry_after("a") is None
    assert len(limiter) == 0


def test_the_limiter_memory_is_bounded() -> None:
    limiter = FailureLimiter(1, max_sources=100, clock=FakeClock())
    for n in range(10_000):
        limiter.record(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == 100
    assert limiter.retry_after("10.0.39.15") is not None  # the most recent are kept


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SpyStore]:
    async with scratch_engine(f"sqlite:///{tmp_path / 'state.db'}") as engine:
        await create_tables(engine)
        yield SpyStore(engine)


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": context_of(scope).key.client.encode()})


async def _authenticate(app: Authenticate, key: str, address: str) -> int:
    scope: Scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions", "client": (address, 5555),
        "headers": [(b"authorization", f"Bearer {key}".encode())],
        SCOPE_KEY: RequestContext(route="/v1/chat/completions", started=0.0, request_id="req_test"),
    }
    sent: list[int] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            sent.append(int(message["status"]))  # type: ignore[call-overload]

    try:
        await app(scope, receive, send)
    except GatewayError as exc:
        return exc.status
    return sent[0]


async def test_random_keys_cost_a_bounded_number_of_lookups_per_address(store: SpyStore) -> None:
    _, good_key = await store.create("acme", "default")
    events: Counter[tuple[str, str]] = Counter()
    app = Authenticate(
        _ok,
        keys=KeyRegistry(store, SECRET),
        failures=AuthFailures(
            FailureLimiter(20), surface="api", source=Fingerprinter().source,
            on_event=lambda surface, outcome: events.update([(surface, outcome)]),
        ),
    )
    assert await _authenticate(app, good_key, "198.51.100.7") == 200  # cached from now on
    statuses = Counter([await _authenticate(app, new_api_key(), "203.0.113.9") for _ in range(300)])
    assert statuses == {401: 20, 429: 280}
    assert store.calls["find_by_secret"] == 1 + 20
    assert events == {("api", "rejected"): 20, ("api", "refused"): 280}
    # Another address is unaffected, and a known key works even from the flooding address.
    assert await _authenticate(app, new_api_key(), "198.51.100.7") == 401
    assert await _authenticate(app, good_key, "203.0.113.9") == 200
    # The same unknown key again and again: looked up once.
    unknown = new_api_key()
    for _ in range(10):
        assert await _authenticate(app, unknown, f"192.0.2.{_}") == 401
    assert store.calls["find_by_secret"] == 1 + 20 + 1 + 1


async def test_concurrent_guesses_cannot_overrun_the_allowance(store: SpyStore) -> None:
    app = Authenticate(
        _ok, keys=KeyRegistry(store, SECRET),
        failures=AuthFailures(FailureLimiter(10), surface="api", source=Fingerprinter().source,
                              on_event=lambda *_: None),
    )
    statuses = await asyncio.gather(*(_authenticate(app, new_api_key(), "203.0.113.9") for _ in range(200)))
    assert Counter(statuses) == {401: 10, 429: 190}
    assert store.calls["find_by_secret"] == 10


async def test_admin_token_guesses_are_limited_per_address_and_logged(
    store: SpyStore, caplog: pytest.LogCaptureFixture
) -> None:
    events: Counter[tuple[str, str]] = Counter()
    admin = create_admin_app(
        store=store, admin_token=TOKEN, tiers=("default",), failures=admin_failures(5, events)
    )
    app = Starlette(routes=[Mount("/admin", app=admin)])

    def client(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 4444))
        return httpx.AsyncClient(transport=transport, base_url="http://gw")

    caplog.set_level(logging.WARNING, logger="modelfence.identity.failures")
    async with client("203.0.113.9") as attacker, client("198.51.100.7") as operator:
        statuses = Counter()
        for n in range(50):
            response = await attacker.get("/admin/v1/keys", headers={"Authorization": f"Bearer guess-{n:04}"})
            statuses[response.status_code] += 1
        assert statuses == {401: 5, 429: 45}
        refused = await attacker.get("/admin/v1/keys", headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 429  # even the right token: the guesser learns nothing
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "too_many_auth_failures"
        ok = await operator.get("/admin/v1/keys", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    assert events == {("admin", "rejected"): 5, ("admin", "refused"): 46}
    failures = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    # Throttled to a line a second (the events above count every failure).
    assert 1 <= len(failures) <= 5 and all("203.0.113.9" in m for m in failures)
    assert any("refusing 203.0.113.9" in r.getMessage() for r in caplog.records)


async def test_a_key_that_cannot_be_checked_now_is_a_503_to_retry_and_not_charged(
    store: SpyStore,
) -> None:
    events: Counter[tuple[str, str]] = Counter()
    registry = KeyRegistry(store, SECRET, unindexed_lookups_per_second=3)
    app = Authenticate(
        _ok, keys=registry,
        failures=AuthFailures(
            FailureLimiter(20), surface="api", source=Fingerprinter().source,
            on_event=lambda surface, outcome: events.update([(surface, outcome)]),
        ),
    )
    await registry.refresh()  # the key index, from every issued key
    # Made-up keys from many addresses: three are looked up (401), the rest wait (503).
    statuses = Counter([await _authenticate(app, new_api_key(), f"10.0.{i}.1") for i in range(50)])
    assert statuses == {401: 3, 503: 47} and store.calls["find_by_secret"] == 3
    assert events == {("api", "rejected"): 3}  # a 503 is no failed authentication
    _, created = await store.create("acme", "default")  # since the last poll
    assert await _authenticate(app, created, "198.51.100.7") == 503
    await registry.refresh()
    assert await _authenticate(app, created, "198.51.100.7") == 200
    # The store down, a key not cached here: 503 (it may be good), not 500 and not 401.
    _, uncached = await store.create("beta", "default")
    store.down = True
    app_down = Authenticate(_ok, keys=KeyRegistry(store, SECRET), failures=app.failures)
    assert await _authenticate(app_down, uncached, "198.51.100.8") == 503
